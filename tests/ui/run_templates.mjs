#!/usr/bin/env node
// Opens every template of example_workflows/ in the real ComfyUI frontend, runs it, and takes a screenshot.
//
//   PW_DIR=<folder with node_modules/playwright-core> node tests/ui/run_templates.mjs --url URL
//       [--shots DIR] [--thumbnails] [--only SUBSTRING] [--no-run]
//
// Needs a running ComfyUI with this pack (tests/comfyui_server.py) whose 'uniar' folder holds a checkpoint named
// like the templates' loader (UniAR-SFT: a link to a fixture is enough), and Debian's chromium. For each template:
// loads it with app.loadGraphData, records missing node types, open dialogs (e.g. the missing-models dialog),
// toasts and page errors; then (unless --no-run) shrinks the sizes for a CPU run (AR 64x64, 2 decoder / KSampler steps,
// 12 answer tokens), queues it, waits for the queue to empty, reads the answer box of every Caption node and takes
// a screenshot (DIR/<template>.png). --thumbnails also writes example_workflows/<template>.jpg (ImageMagick's
// convert). Prints one JSON report; exit 0 only when every template loaded with no missing nodes, no dialog, no
// page error, ran without an execution error and every Caption node shows a non-empty answer.
import { createRequire } from 'node:module';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { execFileSync, execSync } from 'node:child_process';

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, '..', '..');
const require = createRequire(path.join(process.env.PW_DIR || here, 'package.json'));
const { chromium } = require('playwright-core');

const opt = { url: 'http://127.0.0.1:8188', shots: path.join(os.tmpdir(), 'uniar-templates'), thumbnails: false,
  only: '', run: true };
for (let i = 2; i < process.argv.length; i++) {
  const a = process.argv[i];
  if (a === '--thumbnails') opt.thumbnails = true;
  else if (a === '--no-run') opt.run = false;
  else if (['--url', '--shots', '--only'].includes(a)) opt[a.slice(2)] = process.argv[++i];
  else { console.error(`unknown argument ${a}`); process.exit(2); }
}
const dir = path.join(root, 'example_workflows');
const templates = fs.readdirSync(dir).filter((f) => f.endsWith('.json') && f.includes(opt.only)).sort();
fs.mkdirSync(opt.shots, { recursive: true });

const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'uniar-run-'));
const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath: process.env.CHROMIUM || execSync('command -v chromium').toString().trim(),
  headless: true, viewport: { width: 1600, height: 1000 },
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const visibleText = (page, sel) => page.evaluate((sel) => [...document.querySelectorAll(sel)]
  .filter((d) => d.offsetParent !== null).map((d) => d.innerText.replace(/\s+/g, ' ').trim().slice(0, 400)), sel);
const closeDialogs = async (page) => {
  for (let i = 0; i < 3 && (await visibleText(page, '.p-dialog')).length; i++) {
    await page.keyboard.press('Escape');
    await page.waitForTimeout(400);
  }
};
// dialogs that are about this template (missing nodes / models), not the frontend's own first-run browser
const isProblemDialog = (text) => /missing|not found|error/i.test(text);
const report = { url: opt.url, frontend: null, templates: {} };
let ok = templates.length > 0;
try {
  const page = context.pages()[0] || await context.newPage();
  let pageErrors = [];
  page.on('pageerror', (e) => pageErrors.push(String(e.stack || e).split('\n')[0].slice(0, 300)));
  await page.goto(opt.url, { waitUntil: 'domcontentloaded', timeout: 90000 });
  await page.waitForSelector('#graph-canvas', { state: 'visible', timeout: 90000 });
  await page.waitForFunction(() => window.app?.graph && window.LiteGraph &&
    'UniARGenerate' in window.LiteGraph.registered_node_types, null, { timeout: 90000 });
  await page.waitForTimeout(4000);
  report.frontend = await page.evaluate(() => window.__COMFYUI_FRONTEND_VERSION__ ?? null);
  await closeDialogs(page); // the first-run template browser
  for (const file of templates) {
    const name = file.slice(0, -5);
    const r = { missingNodes: [], dialogs: [], toasts: [], pageErrors: [], error: null, answers: [] };
    pageErrors = [];
    const wf = JSON.parse(fs.readFileSync(path.join(dir, file), 'utf8'));
    // the server's test image instead of ComfyUI's input/example.png, which a temporary base folder lacks
    for (const n of wf.nodes) if (n.type === 'LoadImage' && Array.isArray(n.widgets_values)) n.widgets_values[0] = 'uniar_test.png';
    r.missingNodes = await page.evaluate(async (wf) => {
      const missing = wf.nodes.map((n) => n.type).filter((t) => !(t in window.LiteGraph.registered_node_types));
      await window.app.loadGraphData(wf);
      return missing;
    }, wf);
    await page.waitForTimeout(1500);
    r.dialogs = (await visibleText(page, '.p-dialog')).filter(isProblemDialog);
    r.toasts = await visibleText(page, '.p-toast-message');
    await closeDialogs(page);
    if (opt.run) {
      r.error = await page.evaluate(async () => {
        const { app } = window;
        for (const node of app.graph._nodes ?? app.graph.nodes) {
          const set = (k, v) => {
            const w = node.widgets?.find((x) => x.name === k);
            if (!w) return;
            w.value = v;
            if (k === 'image') { try { w.callback?.(v); } catch (e) { /* the preview only */ } }
          };
          if (node.type === 'UniARGenerate') { set('width', 64); set('height', 64); set('control_after_generate', 'fixed'); }
          if (node.type === 'UniARDecode') { set('steps', 2); set('control_after_generate', 'fixed'); }
          if (node.type === 'KSampler') { set('steps', 2); set('control_after_generate', 'fixed'); }
          if (node.type === 'UniARCaption') set('max_new_tokens', 12);
        }
        let err = null;
        const onError = (e) => { err = `${e.detail?.node_type}: ${e.detail?.exception_message}`.slice(0, 300); };
        app.api?.addEventListener?.('execution_error', onError);
        try { await app.queuePrompt(0, 1); } catch (e) { return `queue: ${String(e).slice(0, 300)}`; }
        const t0 = Date.now();
        await new Promise((res) => setTimeout(res, 1000));
        while (Date.now() - t0 < 600000) {
          const q = await (await fetch('/queue')).json();
          if (!q.queue_running.length && !q.queue_pending.length) break;
          await new Promise((res) => setTimeout(res, 500));
        }
        await new Promise((res) => setTimeout(res, 1500));
        app.api?.removeEventListener?.('execution_error', onError);
        return err;
      });
      r.answers = await page.evaluate(() => [...document.querySelectorAll('textarea[data-uniar-answer]')]
        .filter((t) => t.offsetParent !== null).map((t) => t.value));
      const captions = wf.nodes.filter((n) => n.type === 'UniARCaption').length;
      if (r.answers.length < captions || r.answers.some((a) => !a.trim())) r.error ??= 'a Caption node shows no answer';
    }
    r.pageErrors = pageErrors;
    await closeDialogs(page);
    const shot = path.join(opt.shots, `${name}.png`);
    await page.screenshot({ path: shot });
    if (opt.thumbnails) { // the graph only (no frontend chrome), as the Templates browser shows it
      const clip = await page.evaluate(() => {
        const { app } = window;
        const ds = app.canvas.ds;
        const rect = app.canvas.canvas.getBoundingClientRect();
        const nodes = app.graph._nodes ?? app.graph.nodes;
        const xs = nodes.flatMap((n) => [n.pos[0], n.pos[0] + n.size[0]]);
        const ys = nodes.flatMap((n) => [n.pos[1] - 30, n.pos[1] + n.size[1]]);
        const sx = (x) => rect.left + (x + ds.offset[0]) * ds.scale;
        const sy = (y) => rect.top + (y + ds.offset[1]) * ds.scale;
        const x0 = Math.max(rect.left, sx(Math.min(...xs)) - 10), y0 = Math.max(rect.top, sy(Math.min(...ys)) - 10);
        const x1 = Math.min(rect.right, sx(Math.max(...xs)) + 10), y1 = Math.min(rect.bottom, sy(Math.max(...ys)) + 10);
        return { x: x0, y: y0, width: x1 - x0, height: y1 - y0 };
      });
      const crop = path.join(opt.shots, `${name}.graph.png`);
      // only the graph: the canvas and its DOM widgets; the floating menus, minimap and toasts hidden
      const style = await page.addStyleTag({ content: 'body * { visibility: hidden !important; } ' +
        '#graph-canvas, .dom-widget, .dom-widget * { visibility: visible !important; }' });
      await page.waitForTimeout(200);
      await page.screenshot({ path: crop, clip });
      await style.evaluate((el) => el.remove());
      execFileSync('convert', [crop, '-resize', '960x720', '-quality', '85', path.join(dir, `${name}.jpg`)]);
    }
    r.screenshot = shot;
    report.templates[name] = r;
    if (r.missingNodes.length || r.dialogs.length || r.pageErrors.length || r.error) ok = false;
  }
} finally {
  await context.close();
  fs.rmSync(userDataDir, { recursive: true, force: true });
}
console.log(JSON.stringify(report, null, 2));
process.exit(ok ? 0 : 1);
