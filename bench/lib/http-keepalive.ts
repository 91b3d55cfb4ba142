import http from "node:http";

/**
 * A small JSON-over-HTTP client on node:http with a keep-alive agent: cheaper
 * on CPU than fetch, which matters when the load generator shares two cores
 * with the system under test. Every request has a timeout.
 */
export interface HttpAnswer<T = unknown> {
  status: number;
  body: T;
}

export class KeepAliveClient {
  readonly agent: http.Agent;
  private readonly host: string;
  private readonly port: number;

  constructor(baseUrl: string, maxSockets = 1024) {
    const u = new URL(baseUrl);
    if (u.hostname !== "127.0.0.1" && u.hostname !== "localhost") throw new Error(`refusing to send load to ${u.hostname}: loopback only`);
    this.host = u.hostname;
    this.port = Number(u.port);
    this.agent = new http.Agent({ keepAlive: true, maxSockets, maxFreeSockets: maxSockets, scheduling: "lifo" });
  }

  /** Requests sent again after the server closed an idle kept-alive socket as they were written to it. */
  resent = 0;

  /**
   * One request. A request written to a kept-alive socket that the server
   * closed as idle at the same moment fails with ECONNRESET before the server
   * read it (about 1 in 10,000 here: one in each 10,000-execution phase of
   * `--memory` on 2026-12-02); a GET is sent once more, as Node's documentation
   * advises for an idempotent request reset on `request.reusedSocket` (a POST
   * stays failed: the server may have read it). The bench counts `resent`;
   * any other error, and a second reset, is the caller's.
   */
  async request<T = unknown>(method: string, path: string, opts: { headers?: Record<string, string>; body?: unknown; timeoutMs?: number } = {}): Promise<HttpAnswer<T>> {
    try {
      return await this.#once<T>(method, path, opts);
    } catch (err) {
      // Only a GET is sent again: a POST the server did read after all would start a second execution.
      if (!(err instanceof StaleSocket) || method !== "GET") throw err;
      this.resent += 1;
      return await this.#once<T>(method, path, opts, false);
    }
  }

  #once<T>(method: string, path: string, opts: { headers?: Record<string, string>; body?: unknown; timeoutMs?: number }, mayResend = true): Promise<HttpAnswer<T>> {
    const payload = opts.body === undefined ? undefined : Buffer.from(JSON.stringify(opts.body));
    return new Promise((resolve, reject) => {
      const req = http.request(
        {
          host: this.host,
          port: this.port,
          method,
          path,
          agent: this.agent,
          headers: {
            ...(payload ? { "content-type": "application/json", "content-length": String(payload.length) } : {}),
            ...opts.headers,
          },
          timeout: opts.timeoutMs ?? 30_000,
        },
        (res) => {
          const chunks: Buffer[] = [];
          res.on("data", (c: Buffer) => chunks.push(c));
          res.on("end", () => {
            const text = Buffer.concat(chunks).toString("utf8");
            let body: unknown = text;
            try {
              body = text ? JSON.parse(text) : null;
            } catch {}
            resolve({ status: res.statusCode ?? 0, body: body as T });
          });
          res.on("error", reject);
        },
      );
      req.on("timeout", () => req.destroy(new Error(`${method} ${path}: no answer within ${opts.timeoutMs ?? 30_000} ms`)));
      req.on("error", (err: NodeJS.ErrnoException) => reject(mayResend && req.reusedSocket && err.code === "ECONNRESET" ? new StaleSocket(err) : err));
      if (payload) req.write(payload);
      req.end();
    });
  }

  close(): void {
    this.agent.destroy();
  }
}

/** A reset on a reused socket before any answer: the server closed it as idle, and most likely never read the request. */
class StaleSocket extends Error {
  constructor(readonly cause: Error) {
    super(cause.message);
  }
}
