#!/usr/bin/env node
// Opens every template of example_workflows/ in the real ComfyUI frontend, runs it, and takes a screenshot, once
// per renderer: the classic LiteGraph canvas and Nodes 2.0 (the Vue node renderer, setting Comfy.VueNodes.Enabled).
//
//   PW_DIR=<folder with node_modules/playwright-core> node tests/ui/run_templates.mjs --url URL
//       [--shots DIR] [--thumbnails] [--only SUBSTRING] [--no-run] [--renderers classic,nodes2]
//
// Needs a running ComfyUI with this pack (tests/comfyui_server.py) whose 'uniar' folder holds a checkpoint named
// like the templates' loader (UniAR-SFT: a link to a fixture is enough), and Debian's chromium. Before the page
// loads, the user setting Comfy.TutorialCompleted is set true (so the frontend's first-run Templates browser does
// not cover the graph). For each renderer (default: both) Comfy.VueNodes.Enabled is set through the frontend's
// settings API and the page reloaded; a frontend without Nodes 2.0 (no such user setting: 1.27 has it only as a
// hidden experimental switch; or no [data-node-id] node elements after a template is loaded) reports that renderer
// as "unsupported" instead of failing. At the end Comfy.VueNodes.Enabled is set back to the value the frontend had
// for it before. For each template: loads it with app.loadGraphData, records missing node types, open dialogs
// (e.g. the missing-models dialog), toasts and page errors; then (unless --no-run) shrinks the sizes for a CPU run
// (AR 64x64, 2 decoder / KSampler steps, 12 answer tokens), queues it (the server's cache is emptied once per
// renderer, so each renderer's run executes the nodes), waits for the queue to empty, and for every Caption node
// compares the answer /history holds for it with what the node SHOWS in the DOM: classic, the answer widget's
// textarea element; Nodes 2.0, a textarea inside the node's element ([data-node-id="ID"] textarea). The box must be
// visible, read-only and hold exactly the answer. Then a screenshot (DIR/<renderer>/<template>.png). --thumbnails
// (classic renderer only) also writes example_workflows/<template>.jpg (ImageMagick's convert). Prints one JSON
// report with per-renderer results; exit 0 only when, in every supported renderer, every template loaded with no
// missing nodes, no dialog, no page error, ran without an execution error and every Caption node shows its answer.
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

const RENDERERS = { classic: false, nodes2: true }; // the value of Comfy.VueNodes.Enabled
const opt = { url: 'http://127.0.0.1:8188', shots: path.join(os.tmpdir(), 'uniar-templates'), thumbnails: false,
  only: '', run: true, renderers: 'classic,nodes2' };
for (let i = 2; i < process.argv.length; i++) {
  const a = process.argv[i];
  if (a === '--thumbnails') opt.thumbnails = true;
  else if (a === '--no-run') opt.run = false;
  else if (['--url', '--shots', '--only', '--renderers'].includes(a)) opt[a.slice(2)] = process.argv[++i];
  else { console.error(`unknown argument ${a}`); process.exit(2); }
}
const renderers = opt.renderers.split(',').map((r) => r.trim()).filter(Boolean);
if (!renderers.length || renderers.some((r) => !(r in RENDERERS))) {
  console.error(`--renderers takes a comma-separated list of ${Object.keys(RENDERERS).join(', ')}`);
  process.exit(2);
}
if (opt.thumbnails && !renderers.includes('classic')) console.error('--thumbnails: written by the classic renderer only');
const dir = path.join(root, 'example_workflows');
const templates = fs.readdirSync(dir).filter((f) => f.endsWith('.json') && f.includes(opt.only)).sort();
const base = opt.url.replace(/\/+$/, '');

// the server's user settings (the store the frontend's settings API writes to)
const postSetting = (id, value) => fetch(`${base}/settings/${encodeURIComponent(id)}`,
  { method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(value) });
await postSetting('Comfy.TutorialCompleted', true); // no first-run Templates browser over the graph
let vueNodesBefore; // the renderer setting as the frontend saw it before this run (its default where unset)

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

// the frontend's settings API: the extension manager's (1.1x+) or the older app.ui.settings one
const frontendSetting = (page, id, value) => page.evaluate(async ([id, value]) => {
  const { app } = window;
  const s = app.extensionManager?.setting;
  if (value !== undefined) {
    if (s?.set) await s.set(id, value);
    else if (app.ui?.settings?.setSettingValueAsync) await app.ui.settings.setSettingValueAsync(id, value);
    else throw new Error('no settings API');
  }
  return s?.get ? s.get(id) : app.ui?.settings?.getSettingValue?.(id);
}, [id, value]);

const openApp = async (page, reload) => {
  if (reload) await page.reload({ waitUntil: 'domcontentloaded', timeout: 90000 });
  else await page.goto(opt.url, { waitUntil: 'domcontentloaded', timeout: 90000 });
  await page.waitForSelector('#graph-canvas', { state: 'visible', timeout: 90000 });
  await page.waitForFunction(() => window.app?.graph && window.LiteGraph &&
    'UniARGenerate' in window.LiteGraph.registered_node_types, null, { timeout: 90000 });
  await page.waitForTimeout(4000);
  await closeDialogs(page); // a first-run dialog, should one still open
};

// What every Caption node shows: the answer box's value, whether it is visible on the page, read-only.
const shownAnswers = (page, ids, renderer) => page.evaluate(([ids, renderer]) => {
  const { app } = window;
  const seen = (el) => {
    if (!el || !el.isConnected || el.offsetParent === null) return false;
    const r = el.getBoundingClientRect();
    if (r.width < 4 || r.height < 4) return false;
    if (r.right <= 0 || r.bottom <= 0 || r.left >= innerWidth || r.top >= innerHeight) return false;
    for (let e = el; e; e = e.parentElement) {
      const cs = getComputedStyle(e);
      if (cs.visibility === 'hidden' || cs.display === 'none' || Number(cs.opacity) === 0) return false;
    }
    return true;
  };
  const out = {};
  for (const id of ids) {
    let boxes;
    if (renderer === 'classic') {
      const node = app.graph.getNodeById(id);
      const w = node?.widgets?.find((x) => x.name === 'uniar_answer');
      boxes = w?.element instanceof HTMLTextAreaElement ? [w.element] : [];
    } else {
      const el = document.querySelector(`[data-node-id="${id}"]`);
      boxes = el ? [...el.querySelectorAll('textarea')] : [];
    }
    out[id] = boxes.map((t) => ({ value: t.value, visible: seen(t), readOnly: t.readOnly }));
  }
  return out;
}, [ids, renderer]);

const report = { url: opt.url, frontend: null, renderers: {} };
let ok = templates.length > 0;
try {
  const page = context.pages()[0] || await context.newPage();
  let pageErrors = [];
  page.on('pageerror', (e) => pageErrors.push(String(e.stack || e).split('\n')[0].slice(0, 300)));
  await openApp(page, false);
  report.frontend = await page.evaluate(() => window.__COMFYUI_FRONTEND_VERSION__ ?? null);
  vueNodesBefore = await frontendSetting(page, 'Comfy.VueNodes.Enabled').catch(() => undefined);
  for (const renderer of renderers) {
    const rr = { status: 'pass', vueNodesSetting: null, templates: {} };
    report.renderers[renderer] = rr;
    const shots = path.join(opt.shots, renderer);
    fs.mkdirSync(shots, { recursive: true });
    if (RENDERERS[renderer]) {
      // Nodes 2.0 is a user setting ("Modern Node Design (Nodes 2.0)", 1.3x+); 1.27 has only a hidden experimental
      // Vue node switch that does not show widget values set from JavaScript (not even the frontend's own)
      const def = await page.evaluate(() => {
        const d = window.app.ui?.settings?.settingsLookup?.['Comfy.VueNodes.Enabled'];
        return d ? { type: d.type ?? null, name: d.name ?? null } : null;
      });
      rr.setting = def;
      if (!def || def.type === 'hidden') {
        rr.status = 'unsupported';
        rr.reason = def ? 'Comfy.VueNodes.Enabled is a hidden experimental switch in this frontend (no Nodes 2.0)'
          : 'this frontend has no Comfy.VueNodes.Enabled setting';
        continue;
      }
    }
    try {
      await frontendSetting(page, 'Comfy.VueNodes.Enabled', RENDERERS[renderer]);
    } catch (e) {
      if (RENDERERS[renderer]) { rr.status = 'unsupported'; rr.reason = `setting: ${String(e).slice(0, 200)}`; continue; }
      throw e;
    }
    pageErrors = [];
    // empty the server's cache, so each renderer's run executes the nodes again (not only replays cached results)
    if (opt.run) await fetch(`${base}/free`, { method: 'POST', headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ unload_models: true, free_memory: true }) }).catch(() => {});
    await openApp(page, true);
    rr.vueNodesSetting = await frontendSetting(page, 'Comfy.VueNodes.Enabled');
    if (Boolean(rr.vueNodesSetting) !== RENDERERS[renderer]) {
      if (RENDERERS[renderer]) { rr.status = 'unsupported'; rr.reason = 'Comfy.VueNodes.Enabled does not stay set'; continue; }
      rr.status = 'fail'; rr.reason = 'Comfy.VueNodes.Enabled could not be turned off'; ok = false; continue;
    }
    let first = true;
    for (const file of templates) {
      const name = file.slice(0, -5);
      const r = { missingNodes: [], dialogs: [], toasts: [], pageErrors: [], error: null, answers: {} };
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
      if (RENDERERS[renderer]) await page.waitForFunction(() => document.querySelector('[data-node-id]'), null,
        { timeout: 15000 }).catch(() => {});
      const vueNodes = await page.evaluate(() => document.querySelectorAll('[data-node-id]').length);
      if (RENDERERS[renderer] && !vueNodes) {
        if (first) { rr.status = 'unsupported'; rr.reason = 'no Nodes 2.0 node elements ([data-node-id]) after loading a template'; break; }
        r.error = 'no Nodes 2.0 node elements ([data-node-id])';
      }
      if (!RENDERERS[renderer] && vueNodes) r.error = `classic renderer, but ${vueNodes} Nodes 2.0 node elements`;
      first = false;
      r.dialogs = (await visibleText(page, '.p-dialog')).filter(isProblemDialog);
      r.toasts = await visibleText(page, '.p-toast-message');
      await closeDialogs(page);
      if (opt.run && !r.error) {
        const run = await page.evaluate(async () => {
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
          const history = async () => (await fetch('/history?max_items=200')).json();
          const known = new Set(Object.keys(await history()));
          let err = null;
          const onError = (e) => { err = `${e.detail?.node_type}: ${e.detail?.exception_message}`.slice(0, 300); };
          app.api?.addEventListener?.('execution_error', onError);
          try { await app.queuePrompt(0, 1); } catch (e) { return { err: `queue: ${String(e).slice(0, 300)}` }; }
          const t0 = Date.now();
          await new Promise((res) => setTimeout(res, 1000));
          while (Date.now() - t0 < 600000) {
            const q = await (await fetch('/queue')).json();
            if (!q.queue_running.length && !q.queue_pending.length) break;
            await new Promise((res) => setTimeout(res, 500));
          }
          await new Promise((res) => setTimeout(res, 1500));
          app.api?.removeEventListener?.('execution_error', onError);
          const entries = Object.entries(await history()).filter(([id]) => !known.has(id));
          if (entries.length !== 1) return { err: err ?? `${entries.length} new /history entries (expected 1)` };
          const outputs = {};
          for (const [id, o] of Object.entries(entries[0][1].outputs ?? {})) if (o?.text !== undefined) outputs[id] = o.text;
          const cached = (entries[0][1].status?.messages ?? []).find((m) => m[0] === 'execution_cached')?.[1]?.nodes;
          return { err, promptId: entries[0][0], outputs, cached: cached ?? null };
        });
        r.error = run.err;
        r.promptId = run.promptId;
        r.cachedNodes = run.cached; // node ids the server took from its cache
        const ids = wf.nodes.filter((n) => n.type === 'UniARCaption').map((n) => n.id);
        const shown = await shownAnswers(page, ids, renderer);
        for (const id of ids) {
          const t = run.outputs?.[String(id)];
          const expected = Array.isArray(t) ? t.filter((x) => typeof x === 'string').join('\n\n') : (t ?? null);
          const boxes = shown[id] ?? [];
          const match = boxes.find((b) => b.value === expected);
          const a = { history: expected, shown: boxes, visible: !!match?.visible, readOnly: !!match?.readOnly,
            ok: !!expected?.trim() && !!match?.visible && !!match?.readOnly };
          r.answers[id] = a;
          if (!a.ok) {
            r.error ??= !expected?.trim() ? `Caption node ${id}: no answer in /history`
              : !match ? `Caption node ${id} does not show the answer /history holds`
              : !match.visible ? `Caption node ${id}: the answer box is not visible` : `Caption node ${id}: the answer box is editable`;
          }
        }
        // the answer box is no part of the saved workflow or of the prompt: the Caption nodes' widgets_values keep
        // the template's length and the answer stays out of them
        const saved = await page.evaluate(async (ids) => {
          const { app } = window;
          const g = app.graph.serialize();
          const p = await app.graphToPrompt();
          return Object.fromEntries(ids.map((id) => [id, {
            widgets_values: g.nodes.find((n) => n.id === id)?.widgets_values ?? null,
            promptInputs: Object.keys(p.output?.[String(id)]?.inputs ?? {}),
          }]));
        }, ids);
        for (const id of ids) {
          const want = wf.nodes.find((n) => n.id === id).widgets_values;
          const got = saved[id];
          const answer = r.answers[id]?.history;
          if (!Array.isArray(got.widgets_values) || got.widgets_values.length !== want.length ||
            (answer && got.widgets_values.includes(answer)) || got.promptInputs.includes('uniar_answer')) {
            r.error ??= `Caption node ${id}: the answer box is serialized (${JSON.stringify(got).slice(0, 200)})`;
          }
        }
      }
      r.pageErrors = pageErrors;
      await closeDialogs(page);
      const shot = path.join(shots, `${name}.png`);
      await page.screenshot({ path: shot });
      if (opt.thumbnails && renderer === 'classic') { // the graph only (no frontend chrome), as the Templates browser shows it
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
        const crop = path.join(shots, `${name}.graph.png`);
        // only the graph: the canvas and its DOM widgets; the floating menus, minimap and toasts hidden
        const style = await page.addStyleTag({ content: 'body * { visibility: hidden !important; } ' +
          '#graph-canvas, .dom-widget, .dom-widget * { visibility: visible !important; }' });
        await page.waitForTimeout(200);
        await page.screenshot({ path: crop, clip });
        await style.evaluate((el) => el.remove());
        execFileSync('convert', [crop, '-resize', '960x720', '-quality', '85', path.join(dir, `${name}.jpg`)]);
      }
      r.screenshot = shot;
      rr.templates[name] = r;
      if (r.missingNodes.length || r.dialogs.length || r.pageErrors.length || r.error) rr.status = 'fail';
    }
    if (rr.status === 'fail') ok = false;
  }
} finally {
  await context.close();
  fs.rmSync(userDataDir, { recursive: true, force: true });
  if (typeof vueNodesBefore === 'boolean') await postSetting('Comfy.VueNodes.Enabled', vueNodesBefore).catch(() => {});
}
report.vueNodesSettingRestored = vueNodesBefore ?? null;
report.ok = ok;
console.log(JSON.stringify(report, null, 2));
process.exit(ok ? 0 : 1);
