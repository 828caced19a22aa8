// Run llama.cpp (node-llama-cpp's prebuilt CPU binary) on a GGUF file and report, as one
// JSON object on stdout, what llamaforge's tests compare against:
//   tokenize:   token ids of each text (no BOS added, special-token text kept as text)
//   generate:   greedy continuation ids of each prompt (ids given by the caller)
//   perplexity: mean NLL over windows of `window` tokens overlapping by one token, the
//               same windows llamaforge.eval.perplexity scores
//   top:        the next-token probability llama.cpp gives its top token at every prompt end
// The request is one JSON object on stdin:
//   {"model": path, "threads": 2, "context": 512, "tokenize": [text, ...],
//    "generate": [{"ids": [...], "max_tokens": n, "stop": [...]}, ...],
//    "perplexity": {"ids": [...], "window": n}}
import { getLlama, LlamaLogLevel } from "node-llama-cpp";

async function readStdin() {
  const chunks = [];
  for await (const c of process.stdin) chunks.push(c);
  return JSON.parse(Buffer.concat(chunks).toString("utf8"));
}

const req = await readStdin();
const llama = await getLlama({
  gpu: false,
  build: "never",
  usePrebuiltBinaries: true,
  progressLogs: false,
  logLevel: LlamaLogLevel.error,
  maxThreads: req.threads ?? 2,
});
const model = await llama.loadModel({ modelPath: req.model, gpuLayers: 0, checkTensors: true });
const contextSize = req.context ?? 512;
const context = await model.createContext({
  contextSize,
  batchSize: contextSize,
  threads: req.threads ?? 2,
  sequences: 1,
  flashAttention: false,
});
const seq = context.getSequence();
const out = { train_context: model.trainContextSize, bos: model.tokens.bos, eos: model.tokens.eos };

if (req.tokenize) {
  out.tokenize = req.tokenize.map((t) => Array.from(model.tokenize(t, false)));
}

if (req.generate) {
  out.generate = [];
  out.top = [];
  for (const g of req.generate) {
    await seq.clearHistory();
    const stop = new Set(g.stop ?? []);
    const ids = g.ids;
    const generated = [];
    const input = [...ids.slice(0, -1), [ids[ids.length - 1], { generateNext: { token: true, confidence: true } }]];
    let res = await seq.controlledEvaluate(input);
    let next = res[ids.length - 1].next;
    out.top.push(next.confidence);
    while (generated.length < g.max_tokens) {
      const tok = next.token;
      generated.push(tok);
      if (stop.has(tok) || generated.length >= g.max_tokens) break;
      res = await seq.controlledEvaluate([[tok, { generateNext: { token: true } }]]);
      next = res[0].next;
    }
    out.generate.push(generated);
  }
}

if (req.perplexity) {
  const ids = req.perplexity.ids;
  const window = Math.min(req.perplexity.window ?? contextSize, contextSize);
  let total = 0;
  let count = 0;
  for (let s = 0; s < ids.length - 1; s += window - 1) {
    const chunk = ids.slice(s, s + window);
    await seq.clearHistory();
    const input = chunk.map((t, i) =>
      i < chunk.length - 1 ? [t, { generateNext: { probabilities: true } }] : t,
    );
    const res = await seq.controlledEvaluate(input);
    for (let i = 0; i < chunk.length - 1; i++) {
      const p = res[i].next.probabilities.get(chunk[i + 1]) ?? 0;
      total += -Math.log(Math.max(p, 1e-30));
      count += 1;
    }
  }
  out.perplexity = { tokens: count, nll: total / count, perplexity: Math.exp(total / count) };
}

process.stdout.write(JSON.stringify(out) + "\n");
await context.dispose();
await model.dispose();
await llama.dispose();
