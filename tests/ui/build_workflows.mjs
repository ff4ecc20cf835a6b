#!/usr/bin/env node
// Builds the UI-format workflow templates (example_workflows/*.json) inside the real ComfyUI frontend, so that every
// node, slot, link and widget value is serialised exactly as the frontend itself does it.
//
//   PW_DIR=<folder with node_modules/playwright-core> node tests/ui/build_workflows.mjs [--url URL] [--out DIR]
//       [--only SUBSTRING]
//
// Needs a running ComfyUI with this pack (tests/comfyui_server.py) and Debian's chromium.  The graph of each
// template is described below (node types, positions, widget values by name, links by input name).
import { createRequire } from 'node:module';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { execSync } from 'node:child_process';

const here = path.dirname(fileURLToPath(import.meta.url));
const require = createRequire(path.join(process.env.PW_DIR || here, 'package.json'));
const { chromium } = require('playwright-core');

const opt = { url: 'http://127.0.0.1:8188', out: path.resolve(here, '..', '..', 'example_workflows'), only: '' };
for (let i = 2; i < process.argv.length; i++) {
  const a = process.argv[i];
  if (a === '--url' || a === '--out' || a === '--only') opt[a.slice(2)] = process.argv[++i];
  else { console.error(`unknown argument ${a}`); process.exit(2); }
}

// No properties.models on the loader: the frontend's missing-model check knows single files only and would list
// the checkpoint *folder* as missing even when it is installed. A missing folder is reported by the loader itself
// (validation message) and by the pack's frontend extension (a notice naming the folder and the Download node).
const loader = (id, pos) => ({
  id, type: 'UniARModelLoader', pos, widgets: { ckpt_name: 'UniAR-SFT', dtype: 'auto', attention: 'auto' },
});
const gen = (id, pos, prompt, extra = {}) => ({
  id, type: 'UniARGenerate', pos, size: [400, 640], // room for the live preview of the tokens drawn so far
  widgets: { prompt, aspect_ratio: 'custom (width x height)', width: 512, height: 512, cfg: 1.5, temperature: 1.0,
    seed: 0, control_after_generate: 'randomize', batch_size: 1, mode: 'fast', ...extra },
});
const dec = (id, pos) => ({
  id, type: 'UniARDecode', pos,
  widgets: { steps: 28, guidance: 1.5, upsampling_ratio: 1.0, seed: 0, control_after_generate: 'randomize', decoder_prompt: '' },
});
const save = (id, pos, prefix) => ({ id, type: 'SaveImage', pos, size: [360, 340], widgets: { filename_prefix: prefix } });
const loadImage = (id, pos) => ({ id, type: 'LoadImage', pos, size: [320, 360], widgets: { image: 'example.png' } });
const caption = (id, pos, question) => ({
  id, type: 'UniARCaption', pos, size: [420, 480],
  widgets: { question, max_new_tokens: 256, do_sample: false, temperature: 1.0, top_p: 1.0, top_k: 0, seed: 0,
    control_after_generate: 'fixed' },
});
const note = (id, pos, text, size = [380, 200]) => ({ id, type: 'MarkdownNote', pos, size, widgets: { text } });
const L = (from, fromSlot, to, input) => ({ from, fromSlot, to, input });
// the native route: the decoder as ComfyUI's MODEL / VAE, sampled by the stock KSampler
const decLoader = (id, pos) => ({ id, type: 'UniARDecoderLoader', pos, size: [300, 80] });
const toCond = (id, pos) => ({ id, type: 'UniARTokensToConditioning', pos, size: [300, 200], widgets: { decoder_prompt: '' } });
const emptyLatent = (id, pos) => ({ id, type: 'UniAREmptyLatent', pos, size: [300, 80], widgets: { upsampling_ratio: 1.0 } });
const ksampler = (id, pos) => ({
  id, type: 'KSampler', pos, size: [320, 470],
  widgets: { seed: 0, control_after_generate: 'randomize', steps: 28, cfg: 1.5, sampler_name: 'euler',
    scheduler: 'simple', denoise: 1.0 },
});
const vaeDecode = (id, pos) => ({ id, type: 'VAEDecode', pos });
const nativeLinks = (model, tokens, dl, tc, el, ks, vd, sv) => [
  L(model, 0, dl, 'model'), L(model, 0, tc, 'model'), L(tokens, 0, tc, 'tokens'), L(tokens, 0, el, 'tokens'),
  L(dl, 0, ks, 'model'), L(tc, 0, ks, 'positive'), L(tc, 1, ks, 'negative'), L(el, 0, ks, 'latent_image'),
  L(ks, 0, vd, 'samples'), L(dl, 1, vd, 'vae'), L(vd, 0, sv, 'images')];
const ROUTES = 'Two routes decode tokens: **UniAR Decode** (one node, the reference decoder: use it to reproduce ' +
  'UniAR) and this one, the decoder as ComfyUI models: any sampler and scheduler, live previews, VAE Decode ' +
  '(Tiled), and every node that takes a MODEL, LATENT or CONDITIONING. KSampler with euler / simple at the ' +
  'same seed is close to UniAR Decode, not equal (its schedule differs slightly); UniAR Reference Noise + ' +
  'Reference Sigmas in SamplerCustomAdvanced reproduce it.';

const SETUP = 'Put the checkpoint folder **UniAR-SFT** (or UniAR-RL) from ' +
  '[Hugging Face](https://huggingface.co/ShareLab-SII/UniAR-SFT) into `ComfyUI/models/uniar/` (the whole folder: ' +
  '`models/uniar/UniAR-SFT/config.json`, ...), or replace the loader with the *UniAR Download Model* node.';

const WORKFLOWS = {
  'UniAR - Text to image': {
    nodes: [
      loader(1, [40, 80]), gen(2, [420, 80], 'A red vintage car parked in front of a pastel blue house, golden hour.'),
      dec(3, [880, 80]), save(4, [1240, 80], 'uniar/t2i'),
      note(5, [40, 300], '### UniAR text to image\nGenerate draws the picture as 32x32-pixel visual tokens, one per ' +
        'step (512x512 = 256 steps; its progress bar shows the tokens drawn so far); Decode turns the tokens into ' +
        'pixels with the SD3.5-based decoder.\n\n' + SETUP, [360, 300]),
    ],
    links: [L(1, 0, 2, 'model'), L(1, 0, 3, 'model'), L(2, 0, 3, 'tokens'), L(3, 0, 4, 'images')],
  },
  'UniAR - Edit an image': {
    nodes: [
      loader(1, [40, 80]), loadImage(2, [40, 260]),
      gen(3, [420, 80], 'Make it look like a watercolor painting.', { aspect_ratio: 'match edit input' }),
      dec(4, [880, 80]), save(5, [1240, 80], 'uniar/edit'),
      note(6, [40, 660], '### UniAR image editing\nThe image is tokenized by the model\'s vision tower and the prompt ' +
        'says what to change. *match edit input* keeps the image\'s shape at about width x height pixels.\n\n' + SETUP, [360, 260]),
    ],
    links: [L(1, 0, 3, 'model'), L(2, 0, 3, 'edit_image'), L(1, 0, 4, 'model'), L(3, 0, 4, 'tokens'), L(4, 0, 5, 'images')],
  },
  'UniAR - Caption and VQA': {
    nodes: [
      loader(1, [40, 80]), loadImage(2, [40, 260]),
      caption(3, [420, 80], 'Describe this image in detail.'),
      note(4, [880, 80], '### UniAR caption / VQA\nAsk anything about the image; the answer appears in the box at the ' +
        'bottom of the Caption node (the pack\'s frontend extension) and on its text output. Only the language model ' +
        'and the vision tower are loaded (no image decoder).\n\n' + SETUP, [360, 260]),
    ],
    links: [L(1, 0, 3, 'model'), L(2, 0, 3, 'image')],
  },
  'UniAR - Reconstruct an image': {
    nodes: [
      loader(1, [40, 80]), loadImage(2, [40, 260]),
      { id: 3, type: 'UniAREncodeImage', pos: [420, 80] }, dec(4, [780, 80]), save(5, [1140, 80], 'uniar/reconstruct'),
      { id: 6, type: 'UniARPreviewTokens', pos: [420, 300], widgets: { mode: 'tiles', level: -1, scale: 2 } },
      { id: 7, type: 'PreviewImage', pos: [780, 420], size: [340, 320] },
      note(8, [40, 660], '### UniAR reconstruct\nImage -> visual tokens -> image: shows what the tokens keep. ' +
        'Preview Tokens draws the bits themselves (no model needed).\n\n' + SETUP, [360, 240]),
    ],
    links: [L(1, 0, 3, 'model'), L(2, 0, 3, 'image'), L(1, 0, 4, 'model'), L(3, 0, 4, 'tokens'), L(4, 0, 5, 'images'),
      L(3, 0, 6, 'tokens'), L(6, 0, 7, 'images')],
  },
  'UniAR - Shared context': {
    nodes: [
      loader(1, [40, 80]), gen(2, [420, 80], 'A cozy reading corner with a green armchair and a tall plant.'),
      dec(3, [880, 80]), save(4, [1240, 80], 'uniar/shared_t2i'),
      caption(5, [420, 760], 'What objects are in this picture?'),
      gen(6, [880, 470], 'Make the armchair red.', { aspect_ratio: 'match edit input' }),
      dec(7, [1340, 500]), save(8, [1700, 500], 'uniar/shared_edit'),
      note(9, [40, 300], '### UniAR shared context\nThe tokens of one generation feed a caption and an edit ' +
        'directly: no decoding and re-encoding of pixels in between.\n\n' + SETUP, [360, 260]),
    ],
    links: [L(1, 0, 2, 'model'), L(1, 0, 3, 'model'), L(2, 0, 3, 'tokens'), L(3, 0, 4, 'images'),
      L(1, 0, 5, 'model'), L(2, 0, 5, 'tokens'), L(1, 0, 6, 'model'), L(2, 0, 6, 'edit_tokens'),
      L(1, 0, 7, 'model'), L(6, 0, 7, 'tokens'), L(7, 0, 8, 'images')],
  },
  'UniAR - Text to image with KSampler': {
    nodes: [
      loader(1, [40, 80]), gen(2, [420, 80], 'A red vintage car parked in front of a pastel blue house, golden hour.'),
      decLoader(3, [880, 80]), toCond(4, [880, 230]), emptyLatent(5, [880, 470]), ksampler(6, [1260, 80]),
      vaeDecode(7, [1620, 80]), save(8, [1620, 200], 'uniar/t2i_ksampler'),
      note(9, [40, 300], '### UniAR text to image with KSampler\n' + ROUTES + '\n\n' + SETUP, [360, 420]),
    ],
    links: [L(1, 0, 2, 'model'), ...nativeLinks(1, 2, 3, 4, 5, 6, 7, 8)],
  },
  'UniAR - Reconstruct with KSampler': {
    nodes: [
      loader(1, [40, 80]), loadImage(2, [40, 260]), { id: 3, type: 'UniAREncodeImage', pos: [420, 80] },
      decLoader(4, [780, 80]), toCond(5, [780, 230]), emptyLatent(6, [780, 470]), ksampler(7, [1160, 80]),
      vaeDecode(8, [1520, 80]), save(9, [1520, 200], 'uniar/reconstruct_ksampler'),
      note(10, [40, 660], '### UniAR reconstruct with KSampler\nImage -> visual tokens -> image through ComfyUI\'s ' +
        'own sampler. ' + ROUTES + '\n\n' + SETUP, [360, 380]),
    ],
    links: [L(1, 0, 3, 'model'), L(2, 0, 3, 'image'), ...nativeLinks(1, 3, 4, 5, 6, 7, 8, 9)],
  },
};

const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'uniar-build-'));
const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath: process.env.CHROMIUM || execSync('command -v chromium').toString().trim(),
  headless: true, viewport: { width: 1600, height: 1000 },
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking'],
});
let failed = false;
try {
  const page = context.pages()[0] || await context.newPage();
  page.on('pageerror', (e) => console.error('pageerror:', String(e).slice(0, 300)));
  await page.goto(opt.url, { waitUntil: 'domcontentloaded', timeout: 60000 });
  await page.waitForFunction(() => window.app?.graph && window.LiteGraph &&
    'UniARGenerate' in window.LiteGraph.registered_node_types, null, { timeout: 60000 });
  await page.waitForTimeout(1500);
  fs.mkdirSync(opt.out, { recursive: true });
  for (const [name, wf] of Object.entries(WORKFLOWS)) {
    if (!name.includes(opt.only)) continue;
    const result = await page.evaluate((wf) => {
      const { app, LiteGraph } = window;
      app.graph.clear();
      const byId = {};
      const problems = [];
      for (const spec of wf.nodes) {
        const node = LiteGraph.createNode(spec.type);
        if (!node) { problems.push(`unknown node type ${spec.type}`); continue; }
        node.id = spec.id;
        app.graph.add(node);
        node.pos = spec.pos;
        for (const [k, v] of Object.entries(spec.widgets || {})) {
          const w = node.widgets?.find((w) => w.name === k);
          if (!w) { problems.push(`${spec.type}: no widget ${k}`); continue; }
          w.value = v;
          if (w.callback && k !== 'image') { try { w.callback(v); } catch (e) { /* ignore */ } }
        }
        if (spec.properties) Object.assign(node.properties, spec.properties);
        if (spec.size) node.size = spec.size; else node.setSize(node.computeSize());
        byId[spec.id] = node;
      }
      for (const l of wf.links) {
        const a = byId[l.from], b = byId[l.to];
        const slot = b.findInputSlot(l.input);
        if (slot < 0) { problems.push(`node ${l.to} has no input ${l.input}`); continue; }
        if (!a.connect(l.fromSlot, b, slot)) problems.push(`could not link ${l.from}:${l.fromSlot} -> ${l.to}.${l.input}`);
      }
      app.graph.setDirtyCanvas(true, true);
      return { problems, graph: app.graph.serialize() };
    }, wf);
    if (result.problems.length) { failed = true; console.error(name, result.problems); }
    // open the template zoomed to fit a 1600x1000 window (the frontend restores extra.ds on load)
    const g = result.graph;
    const xs = g.nodes.flatMap((n) => [n.pos[0], n.pos[0] + n.size[0]]);
    const ys = g.nodes.flatMap((n) => [n.pos[1] - 30, n.pos[1] + n.size[1]]);
    const [minx, maxx, miny, maxy] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
    const scale = Math.min(1, 1450 / (maxx - minx), 860 / (maxy - miny));
    g.extra = { ...(g.extra || {}), ds: { scale: +scale.toFixed(3), offset: [80 / scale - minx, 70 / scale - miny] } };
    const file = path.join(opt.out, `${name}.json`);
    fs.writeFileSync(file, JSON.stringify(result.graph, null, 2) + '\n');
    console.log(`wrote ${file} (${result.graph.nodes.length} nodes, ${result.graph.links.length} links)`);
  }
} finally {
  await context.close();
  fs.rmSync(userDataDir, { recursive: true, force: true });
}
process.exit(failed ? 1 : 0);
