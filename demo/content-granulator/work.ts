/**
 * The granulator's real work: deterministic text generation and extractive
 * summarising, derived only from a stage's input so a retried attempt produces
 * the same output. Work is cut into units (a module, a chapter, a section) so the
 * job object can spread it over its alarm-driven steps.
 */

/** Actions whose work is text, cut into units (a module, a chapter, a section). */
export const TEXT_ACTIONS = ["outline", "chapters", "summary", "echo", "list", "gather", "write_chapter", "quiz", "assemble"] as const;
export type TextAction = (typeof TEXT_ACTIONS)[number];
/** `blob` outputs deterministic bytes (data tier tests); see blobByte. */
export const ACTIONS = [...TEXT_ACTIONS, "blob"] as const;
export type Action = (typeof ACTIONS)[number];

export function isAction(action: string): action is Action {
  return (ACTIONS as readonly string[]).includes(action);
}

/** A unit of work's result and how many words it generated (billed as tokens). */
export interface Piece {
  value: unknown;
  words: number;
}

export interface Work {
  units: number;
  /** For the handshake's estimate, before any work is done. */
  estimatedWords: number;
  unit(index: number): Piece;
  assemble(parts: unknown[]): Piece;
}

type Params = Record<string, unknown>;

/** Parameters that steer the demo itself, never content to summarise. */
const CONTROL_KEYS = new Set(["fault", "steps", "step_ms", "output_bytes"]);

export function isTextAction(action: string): action is TextAction {
  return (TEXT_ACTIONS as readonly string[]).includes(action);
}

/** What a stage of a pipeline graph sees besides its previous output (handshake `inputData`). */
export interface GraphInput {
  stageId: string;
  inputs: Record<string, unknown>;
  item?: unknown;
  itemIndex?: number;
  /** For `gather`: each stored input it read, by key (its size and SHA-256), or the status that refused a key it was not given. */
  read?: Record<string, RefRead>;
  /** For `gather` with `read`: the length of the data token it read with. */
  dataTokenBytes?: number;
}

export type RefRead = { size: number; sha256: string } | { refused: number };

export function prepare(action: TextAction, parameters: Params, previousOutput: unknown, graph?: GraphInput): Work {
  switch (action) {
    case "list":
      return listWork(parameters);
    case "gather":
      return gatherWork(parameters, graph ?? { stageId: "", inputs: {} });
    case "write_chapter":
      return writeChapterWork(parameters, graph?.item, graph?.itemIndex ?? 0);
    case "quiz":
      return quizWork(previousOutput);
    case "assemble":
      return assembleWork(graph?.inputs ?? {});
    case "outline":
      return outlineWork(parameters);
    case "chapters":
      return chaptersWork(parameters, previousOutput);
    case "summary":
      return summaryWork(parameters, previousOutput);
    case "echo":
      return echoWork(parameters, previousOutput);
  }
}

/** Usage as the orchestrator bills it: ~1.3 tokens per generated word, and elapsed work time. */
export function usageOf(words: number, workMs: number): Record<string, number> {
  return { "tokens:openai": Math.max(1, Math.round(words * 1.3)), compute_ms: Math.max(1, Math.round(workMs)) };
}

export function countWords(text: string): number {
  let words = 0;
  let inWord = false;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    const space = c === 32 || c === 10 || c === 9 || c === 13;
    if (!space && !inWord) words++;
    inWord = !space;
  }
  return words;
}

/** A number parameter clamped to [min, max]; anything else gives the default. */
export function intParam(value: unknown, fallback: number, min: number, max: number): number {
  const n = typeof value === "string" && value.trim() !== "" ? Number(value) : value;
  if (typeof n !== "number" || !Number.isFinite(n)) return fallback;
  return Math.min(max, Math.max(min, Math.round(n)));
}

function strParam(value: unknown, fallback: string): string {
  return typeof value === "string" && value.trim() !== "" ? value.trim().slice(0, 200) : fallback;
}

// ---------------------------------------------------------------------------
// Deterministic randomness: same input, same text.

function seedOf(text: string): number {
  let h = 0x811c9dc5; // FNV-1a
  for (let i = 0; i < text.length; i++) {
    h ^= text.charCodeAt(i);
    h = Math.imul(h, 0x01000193);
  }
  return h >>> 0;
}

function rngOf(text: string): <T>(list: readonly T[]) => T {
  let a = seedOf(text);
  return (list) => {
    a = (a + 0x6d2b79f5) | 0; // mulberry32
    let t = Math.imul(a ^ (a >>> 15), 1 | a);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return list[Math.floor((((t ^ (t >>> 14)) >>> 0) / 4294967296) * list.length)];
  };
}

const THEMES = [
  "Foundations of",
  "Core Concepts in",
  "Tools for",
  "Working with",
  "Patterns in",
  "Practical",
  "Advanced",
  "Case Studies in",
  "Measuring",
  "The Future of",
];
const VERBS = ["Understanding", "Exploring", "Applying", "Designing", "Evaluating", "Comparing", "Building", "Planning"];
const NOUNS = [
  "key terms",
  "first principles",
  "common workflows",
  "data sources",
  "quality checks",
  "trade-offs",
  "real-world examples",
  "team practices",
  "risk factors",
  "success metrics",
];
const SENTENCES: readonly ((topic: string, a: string, b: string) => string)[] = [
  (t, a) => `This chapter introduces ${t} and explains why ${a} matters.`,
  (_t, a, b) => `Learners practise ${a} through short exercises built around ${b}.`,
  (_t, a, b) => `A worked example connects ${a} with ${b} one step at a time.`,
  (t, a) => `Common mistakes with ${a} are shown next to better approaches used in ${t}.`,
  (_t, _a, b) => `Each idea is tied back to ${b} so it can be reused at work.`,
  (t) => `By the end, readers can explain the main ideas of ${t} in their own words.`,
  (_t, a, b) => `A short quiz checks how well ${a} and ${b} fit together.`,
];

function lower(text: string): string {
  return text.charAt(0).toLowerCase() + text.slice(1);
}

/** Exactly `target` words of prose about `topic`, built from whole sentences, cut at the end. */
function writeProse(topic: string, subjects: readonly string[], target: number): string {
  const pick = rngOf(`${topic}|${subjects.join("|")}`);
  const pool = subjects.length > 0 ? subjects.map(lower) : NOUNS;
  const words: string[] = [];
  while (words.length < target) {
    const a = pick(pool);
    const others = pool.filter((s) => s !== a);
    words.push(...pick(SENTENCES)(topic, a, pick(others.length > 0 ? others : NOUNS)).split(" "));
  }
  const text = words.slice(0, target).join(" ");
  return /[.!?]$/.test(text) ? text : `${text.replace(/[,;:]$/, "")}.`;
}

// ---------------------------------------------------------------------------
// outline: a course outline from the topic and audience.

interface Module {
  index: number;
  title: string;
  lessons: string[];
}

interface OutlineSpec {
  topic: string;
  audience: string;
  modules: number;
  lessons: number;
}

function outlineSpec(parameters: Params): OutlineSpec {
  return {
    topic: strParam(parameters.topic, "General"),
    audience: strParam(parameters.targetAudience, "general learners"),
    modules: intParam(parameters.modules, 4, 1, 50),
    lessons: intParam(parameters.lessons_per_module, 3, 1, 12),
  };
}

function buildModule(spec: OutlineSpec, index: number): Module {
  const pick = rngOf(`${spec.topic}|${spec.audience}|${index}`);
  const round = Math.floor((index - 1) / THEMES.length);
  const title = `${THEMES[(index - 1) % THEMES.length]} ${spec.topic}${round > 0 ? ` (Part ${round + 1})` : ""}`;
  const lessons: string[] = [];
  while (lessons.length < spec.lessons) {
    const lesson = `${pick(VERBS)} ${pick(NOUNS)}`;
    // Distinct lessons while the vocabulary allows it.
    if (!lessons.includes(lesson) || lessons.length >= VERBS.length * NOUNS.length) lessons.push(lesson);
  }
  return { index, title, lessons };
}

function moduleWords(m: Module): number {
  return countWords(m.title) + m.lessons.reduce((n, l) => n + countWords(l), 0);
}

function outlineWork(parameters: Params): Work {
  const spec = outlineSpec(parameters);
  const title = `${spec.topic}: a course for ${spec.audience}`;
  return {
    units: spec.modules,
    estimatedWords: countWords(title) + spec.modules * (4 + spec.lessons * 3),
    unit(i) {
      const m = buildModule(spec, i + 1);
      return { value: m, words: moduleWords(m) };
    },
    assemble(parts) {
      return { value: { title, audience: spec.audience, modules: parts }, words: countWords(title) };
    },
  };
}

// ---------------------------------------------------------------------------
// chapters: one chapter text per module of the previous stage's outline.

function asModules(previousOutput: unknown, parameters: Params): { title: string; modules: Module[] } {
  const prev = isRecord(previousOutput) ? previousOutput : {};
  if (Array.isArray(prev.modules) && prev.modules.length > 0) {
    const modules = prev.modules.slice(0, 200).map((raw, i): Module => {
      const m = isRecord(raw) ? raw : {};
      return {
        index: typeof m.index === "number" ? m.index : i + 1,
        title: typeof m.title === "string" ? m.title : `Module ${i + 1}`,
        lessons: Array.isArray(m.lessons) ? m.lessons.filter((l): l is string => typeof l === "string") : [],
      };
    });
    return { title: typeof prev.title === "string" ? prev.title : "Course", modules };
  }
  // No outline to work from (chapters used on its own): write one from the parameters.
  const spec = outlineSpec(parameters);
  const modules = Array.from({ length: spec.modules }, (_, i) => buildModule(spec, i + 1));
  return { title: `${spec.topic}: a course for ${spec.audience}`, modules };
}

function chaptersWork(parameters: Params, previousOutput: unknown): Work {
  const { title, modules } = asModules(previousOutput, parameters);
  const target = intParam(parameters.chapter_words, 60, 10, 5000);
  return {
    units: modules.length,
    estimatedWords: modules.length * target,
    unit(i) {
      const m = modules[i];
      const text = writeProse(m.title, m.lessons, target);
      const words = countWords(text);
      return { value: { index: m.index, title: m.title, text, word_count: words }, words };
    },
    assemble(parts) {
      const total = parts.reduce<number>((n, p) => n + (isRecord(p) && typeof p.word_count === "number" ? p.word_count : 0), 0);
      return { value: { title, chapters: parts, total_words: total }, words: 0 };
    },
  };
}

// ---------------------------------------------------------------------------
// summary: one extracted key sentence per section of the input.

interface Section {
  title: string;
  text: string;
}

const MAX_SECTIONS = 50;

function sectionsOf(source: unknown): Section[] {
  let sections: Section[];
  if (isRecord(source) && Array.isArray(source.chapters)) {
    sections = source.chapters.map((c, i) => ({
      title: isRecord(c) && typeof c.title === "string" ? c.title : `Chapter ${i + 1}`,
      text: isRecord(c) && typeof c.text === "string" ? c.text : textOf(c),
    }));
  } else if (isRecord(source) && Array.isArray(source.modules)) {
    sections = source.modules.map((m, i) => ({
      title: isRecord(m) && typeof m.title === "string" ? m.title : `Module ${i + 1}`,
      text: isRecord(m) && Array.isArray(m.lessons) ? `${m.lessons.join(". ")}.` : textOf(m),
    }));
  } else if (typeof source === "string") {
    const paragraphs = source.split(/\n\s*\n/).filter((p) => p.trim() !== "");
    sections = paragraphs.map((text, i) => ({ title: `Part ${i + 1}`, text }));
  } else if (Array.isArray(source) && source.length > 0 && source.every((c) => isRecord(c) && typeof c.text === "string")) {
    // The chapters of a fan-out stage (write_chapter items), in order.
    sections = source.map((c, i) => ({ title: typeof c.title === "string" ? c.title : `Chapter ${i + 1}`, text: c.text as string }));
  } else if (Array.isArray(source)) {
    sections = source.map((item, i) => ({ title: `Item ${i + 1}`, text: textOf(item) }));
  } else if (isRecord(source)) {
    sections = Object.entries(source)
      .filter(([k]) => !CONTROL_KEYS.has(k))
      .map(([k, v]) => ({ title: k, text: textOf(v) }));
  } else {
    sections = [];
  }
  if (sections.length === 0) sections = [{ title: "Input", text: textOf(source) }];
  if (sections.length <= MAX_SECTIONS) return sections;
  // Too many: merge neighbours so the summary stays short.
  const size = Math.ceil(sections.length / MAX_SECTIONS);
  const merged: Section[] = [];
  for (let i = 0; i < sections.length; i += size) {
    const group = sections.slice(i, i + size);
    merged.push({ title: group[0].title, text: group.map((s) => s.text).join(" ") });
  }
  return merged;
}

function textOf(value: unknown): string {
  if (typeof value === "string") return value;
  if (value === null || value === undefined) return "";
  return JSON.stringify(value) ?? "";
}

/** The sentence whose words are most frequent in the section: a crude but honest extractive summary. */
function keySentence(text: string, maxWords = 30): string {
  const sentences = text.split(/(?<=[.!?])\s+/).filter((s) => s.trim() !== "");
  if (sentences.length === 0) return "";
  const freq = new Map<string, number>();
  const termsOf = (s: string) => s.toLowerCase().match(/[a-z0-9']{4,}/g) ?? [];
  for (const s of sentences) for (const t of termsOf(s)) freq.set(t, (freq.get(t) ?? 0) + 1);
  let best = sentences[0];
  let bestScore = -1;
  for (const s of sentences) {
    const terms = termsOf(s);
    const score = terms.reduce((n, t) => n + (freq.get(t) ?? 0), 0) / Math.max(1, terms.length);
    if (score > bestScore) [best, bestScore] = [s, score];
  }
  const words = best.trim().split(/\s+/);
  return words.length > maxWords ? `${words.slice(0, maxWords).join(" ")}...` : words.join(" ");
}

function summaryWork(parameters: Params, previousOutput: unknown): Work {
  const source = previousOutput ?? parameters.text ?? parameters;
  const sections = sectionsOf(source);
  return {
    units: sections.length,
    estimatedWords: sections.length * 25,
    unit(i) {
      const s = sections[i];
      const sentence = keySentence(s.text);
      const line = sentence ? `${s.title}: ${sentence}` : s.title;
      return { value: line, words: countWords(line) };
    },
    assemble(parts) {
      const summary = parts.map(String).join(" ");
      return { value: { summary, word_count: countWords(summary), sections: parts.length }, words: 0 };
    },
  };
}

// ---------------------------------------------------------------------------
// echo: hands its input on unchanged (plumbing tests).

function echoWork(parameters: Params, previousOutput: unknown): Work {
  const value = previousOutput ?? parameters.echo ?? null;
  return {
    units: 1,
    estimatedWords: 1,
    unit: () => ({ value, words: countWords(textOf(value)) }),
    assemble: (parts) => ({ value: parts[0], words: 0 }),
  };
}

// ---------------------------------------------------------------------------
// list and gather: the pipeline graph's plumbing (fan-out lists, fan-in, diamonds).

/**
 * `list`: `{ items: [{ index, label }], count }` with `parameters.items` entries (default 5, at most 5000);
 * `parameters.item_pad` adds `pad`, that many characters, to each entry (a large list of few items).
 */
function listWork(parameters: Params): Work {
  const count = intParam(parameters.items, 5, 0, 5000);
  const pad = intParam(parameters.item_pad, 0, 0, 1024 * 1024);
  const items = Array.from({ length: count }, (_, index) => ({ index, label: `item ${index}`, ...(pad > 0 ? { pad: `${index}`.padEnd(pad, "p") } : {}) }));
  return {
    units: 1,
    estimatedWords: count * 2,
    unit: () => ({ value: null, words: count * 2 }),
    assemble: () => ({ value: { items, count }, words: 0 }),
  };
}

/**
 * `gather`: says what the stage received, `{ stage, inputs, item?, item_index?, read?, data_token_bytes? }`:
 * one entry of `inputs` per dependency, for an item its element of the list, and
 * for stored inputs (`{ $ref }`) what reading them gave (job.ts, digestRefs) and
 * the length of the data token it read with.
 * Billed by the size of what it gathered, so usage differs from item to item.
 */
function gatherWork(parameters: Params, graph: GraphInput): Work {
  const value: Record<string, unknown> = { stage: graph.stageId, inputs: graph.inputs };
  if (graph.itemIndex !== undefined) Object.assign(value, { item: graph.item ?? null, item_index: graph.itemIndex });
  if (graph.read) value.read = graph.read;
  if (graph.dataTokenBytes !== undefined) value.data_token_bytes = graph.dataTokenBytes;
  // `parameters.gather_pad` (per stage, like output_bytes): that many characters more, to make the output large enough to be stored.
  const pad = intParam(perStage(parameters.gather_pad, graph.stageId), 0, 0, 1024 * 1024);
  if (pad > 0) value.pad = "g".repeat(pad);
  const words = countWords(JSON.stringify(value).replace(/[{}[\],:"]/g, " "));
  return {
    units: 1,
    estimatedWords: words,
    unit: () => ({ value: null, words }),
    assemble: () => ({ value, words: 0 }),
  };
}

// ---------------------------------------------------------------------------
// course_parallel: write_chapter (one item per outline module), quiz, assemble.

/** `write_chapter`: one chapter from its item, a module of the outline: `{ index, title, text, word_count }`. */
function writeChapterWork(parameters: Params, item: unknown, itemIndex: number): Work {
  const m = isRecord(item) ? item : {};
  const title = typeof m.title === "string" ? m.title : `Chapter ${itemIndex + 1}`;
  const lessons = Array.isArray(m.lessons) ? m.lessons.filter((l): l is string => typeof l === "string") : [];
  const target = intParam(parameters.chapter_words, 60, 10, 5000);
  return {
    units: 1,
    estimatedWords: target,
    unit() {
      const text = writeProse(title, lessons, target);
      return { value: text, words: countWords(text) };
    },
    assemble(parts) {
      const text = String(parts[0] ?? "");
      return { value: { index: typeof m.index === "number" ? m.index : itemIndex + 1, title, text, word_count: countWords(text) }, words: 0 };
    },
  };
}

/** `quiz`: one question per chapter (its previous output, the chapters), answered by the chapter's key sentence. */
function quizWork(previousOutput: unknown): Work {
  const sections = sectionsOf(previousOutput);
  return {
    units: sections.length,
    estimatedWords: sections.length * 20,
    unit(i) {
      const s = sections[i];
      const question = `What is the main idea of "${s.title}"?`;
      const answer = keySentence(s.text);
      return { value: { chapter: s.title, question, answer }, words: countWords(question) + countWords(answer) };
    },
    assemble: (parts) => ({ value: { questions: parts, count: parts.length }, words: 0 }),
  };
}

/**
 * `assemble`: the course from its inputs, whichever stage sent them: the chapters (a fan-out's
 * array of `write_chapter` outputs, in item order), the summary's text and the quiz's questions;
 * `text` is the whole course as Markdown, the summary first, then every chapter in order, then the quiz.
 */
function assembleWork(inputs: Record<string, unknown>): Work {
  const all = Object.values(inputs);
  const values = all.filter(isRecord);
  const summary = values.find((v) => typeof v.summary === "string")?.summary ?? null;
  const questions = values.find((v) => Array.isArray(v.questions))?.questions ?? [];
  const list = all.find((v): v is unknown[] => Array.isArray(v)) ?? [];
  const chapters = list.filter(isRecord).map((c, i) => ({
    index: typeof c.index === "number" ? c.index : i + 1,
    title: typeof c.title === "string" ? c.title : `Chapter ${i + 1}`,
    text: typeof c.text === "string" ? c.text : "",
  }));
  const quizLines = (Array.isArray(questions) ? questions : []).filter(isRecord).map((q, i) => `${i + 1}. ${String(q.question)} ${String(q.answer)}`);
  const text = [
    `## Summary\n\n${summary ?? ""}`,
    ...chapters.map((c) => `## Chapter ${c.index}: ${c.title}\n\n${c.text}`),
    `## Quiz\n\n${quizLines.join("\n")}`,
  ].join("\n\n");
  return {
    units: 1,
    estimatedWords: countWords(text) + 10,
    unit: () => ({ value: null, words: countWords(text) }),
    assemble: () => ({ value: { summary, quiz: questions, chapters, text, from: Object.keys(inputs).sort() }, words: 0 }),
  };
}

/** A string of exactly `bytes` ASCII bytes (words and spaces), for the large-output fault. */
export function largeOutput(bytes: number): Piece {
  const pick = rngOf(`large|${bytes}`);
  const block: string[] = [];
  let length = 0;
  while (length < 4096) {
    const word = pick(NOUNS).replace(/[^a-z]/g, "");
    block.push(word);
    length += word.length + 1;
  }
  const unit = `${block.join(" ")} `;
  const text = unit.repeat(Math.ceil(bytes / unit.length)).slice(0, bytes);
  return { value: text, words: countWords(text) };
}

// ---------------------------------------------------------------------------
// blob: exactly `output_bytes` deterministic bytes.

/** Largest blob asked for; above the orchestrator's upload limit the kit fails the stage with `output_too_large`. */
const BLOB_MAX = 1024 * 1024 * 1024;
const BLOB_DEFAULT = 1024;
/** The pattern repeats every 65536 bytes (256 values x 256 blocks). */
const BLOB_PERIOD = 65536;

/**
 * `parameters.output_bytes` for this stage: a number applies to every stage;
 * an object is read by stage id (`{ "stage_2": 200000 }`) or stage number (`{ "2": 200000 }`).
 */
export function blobSize(parameters: Params, stageId: string): number {
  return intParam(perStage(parameters.output_bytes, stageId), BLOB_DEFAULT, 0, BLOB_MAX);
}

/** A parameter for this stage: a plain value applies to every stage; an object is read by stage id or stage number. */
function perStage(spec: unknown, stageId: string): unknown {
  return isRecord(spec) ? (spec[stageId] ?? spec[stageId.replace(/^stage_/, "")]) : spec;
}

/**
 * Byte `i` of stage `stage_n`'s blob: `(i + 31 * n + 7 * floor(i / 256)) mod 256`.
 * Tests recompute it to check a result byte for byte.
 */
export function blobByte(stageId: string, i: number): number {
  const n = Number(stageId.replace(/^stage_/, "")) || 0;
  return (i + 31 * n + 7 * Math.floor(i / 256)) & 255;
}

/** One period of the pattern; since it starts at 0 mod the period, every copy of it is the pattern at its offset. */
function blobPeriod(stageId: string): Uint8Array {
  const block = new Uint8Array(BLOB_PERIOD);
  for (let i = 0; i < BLOB_PERIOD; i++) block[i] = blobByte(stageId, i);
  return block;
}

/** Chunk size of the blob stream: a whole number of periods, large enough to keep per-chunk overhead low. */
const BLOB_CHUNK = 16 * BLOB_PERIOD;

/** The blob's `size` bytes as a stream of 1 MiB chunks, generated as they are read. */
export function blobStream(stageId: string, size: number): ReadableStream<Uint8Array> {
  const period = blobPeriod(stageId);
  const block = new Uint8Array(Math.min(BLOB_CHUNK, Math.ceil(size / BLOB_PERIOD) * BLOB_PERIOD));
  for (let at = 0; at < block.length; at += BLOB_PERIOD) block.set(period, at);
  let sent = 0;
  return new ReadableStream<Uint8Array>({
    pull(controller) {
      if (sent >= size) return controller.close();
      const n = Math.min(block.length, size - sent);
      // A copy per chunk: a consumer may transfer or keep the chunk it gets.
      controller.enqueue(block.slice(0, n));
      sent += n;
    },
  });
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}
