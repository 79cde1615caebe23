// What an artist sees in ComfyUI's real frontend, checked in headless Chromium (a dev tool; see
// scripts/comfy_browser_check.sh, which starts the server and runs this).
//
//   node scripts/comfy_browser_check.mjs --url http://127.0.0.1:8188 --out /tmp/shots [--viewports 1280x800,...]
//
// Needs playwright-core (npm) and Debian's chromium (/usr/bin/chromium; no browser download). The server must run
// with this pack and placeholder model files (scripts/comfy_dev_server.py --placeholder-models --transport).
// Checks, each with screenshots in --out and one JSON line of results (report.json):
//   open       every example workflow, opened from the template browser, shows every node inside the window and
//              clear of the menus, sidebar, minimap and toolbars (sampled points hit the canvas or the node's own
//              text boxes), at each viewport; nodes do not overlap; AcT Load is wide enough for its file name
//   failfast   a bad file name (Save's filename, Load's transport_name) stops the whole graph when queued: the
//              server refuses it (nothing runs), and the reason shows on the node
//   inputs     a Learn with one source prompt: the error stays on source_prompts and shows on the node
//   load       AcT Load draws its summary after it ran
//   unit       web/js/node_errors.js on ComfyUI's own error objects
// Exit code 1 when a check fails.
import fs from "node:fs";
import { createRequire } from "node:module";
import os from "node:os";
import path from "node:path";

// playwright-core from this checkout's node_modules, or from the folder in $PLAYWRIGHT_NODE_MODULES (the .sh sets it)
const { chromium } = process.env.PLAYWRIGHT_NODE_MODULES
  ? createRequire(path.join(process.env.PLAYWRIGHT_NODE_MODULES, "noop.js"))("playwright-core")
  : await import("playwright-core");

const args = Object.fromEntries(process.argv.slice(2).reduce((acc, a, i, all) =>
  (a.startsWith("--") ? [...acc, [a.slice(2), all[i + 1]]] : acc), []));
const URL_ = args.url ?? "http://127.0.0.1:8188";
const OUT = args.out ?? fs.mkdtempSync(path.join(os.tmpdir(), "actsteer-browser-"));
const VIEWPORTS = (args.viewports ?? "1280x800,1920x1080,1280x720").split(",").map((v) => v.split("x").map(Number));
const ONLY = args.only ? new Set(args.only.split(",")) : null;
const CHROMIUM = args.chromium ?? "/usr/bin/chromium";
const TEMPLATES = ["AcT SDXL learn and apply style", "AcT SDXL strength sweep", "AcT FLUX remove a concept"];
fs.mkdirSync(OUT, { recursive: true });

const results = [];
function record(check, name, ok, detail = {}) {
  results.push({ check, name, ok, ...detail });
  console.log(`${ok ? "ok  " : "FAIL"} ${check}: ${name}${ok ? "" : ` ${JSON.stringify(detail).slice(0, 600)}`}`);
}
const slug = (s) => s.replace(/[^A-Za-z0-9]+/g, "_");

async function newPage(width, height) {
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), "actsteer-chromium-"));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM, headless: true, viewport: { width, height },
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync"],
  });
  const page = context.pages()[0] ?? (await context.newPage());
  page.on("pageerror", (e) => console.log(`  page error: ${String(e).slice(0, 200)}`));
  await page.goto(URL_, { timeout: 180000 });
  await page.waitForFunction(() => window.app?.graph && window.app?.canvas && window.app?.extensionManager, null,
                             { timeout: 180000 });
  await page.waitForTimeout(1500);
  return { page, close: async () => { await context.close(); fs.rmSync(profile, { recursive: true, force: true }); } };
}

async function openTemplate(page, title) {
  // the first start of a new user shows the template browser by itself; otherwise open it like the sidebar does
  if (!(await page.getByText(title, { exact: true }).first().isVisible().catch(() => false))) {
    await page.evaluate(() => window.app.extensionManager.command.execute("Comfy.BrowseTemplates"));
  }
  await page.getByText(title, { exact: true }).first().click({ timeout: 30000 });
  await page.waitForFunction((t) => window.app.graph.nodes.length > 0 &&
    document.querySelector(".workflow-tabs-container")?.textContent?.includes(t.slice(0, 12)), title, { timeout: 30000 });
  await page.waitForTimeout(1500); // the frontend fits the view in an animation frame after loading
}

// Every node's rectangle on screen, and which sampled points of it are covered by something else.
async function visibility(page) {
  return page.evaluate(() => {
    const { app } = window;
    const canvas = app.canvas.canvas;
    const { offset, scale } = app.canvas.ds;
    const toScreen = ([x, y]) => [(x + offset[0]) * scale, (y + offset[1]) * scale];
    const nodes = app.graph.nodes.map((node) => {
      const [bx, by, bw, bh] = node.getBounding();
      const [x0, y0] = toScreen([bx, by]);
      const [x1, y1] = toScreen([bx + bw, by + bh]);
      const misses = [];
      for (const fx of [0.02, 0.25, 0.5, 0.75, 0.98]) {
        for (const fy of [0.02, 0.25, 0.5, 0.75, 0.98]) {
          const px = x0 + fx * (x1 - x0), py = y0 + fy * (y1 - y0);
          if (px < 0 || py < 0 || px >= innerWidth || py >= innerHeight) { misses.push(["outside", fx, fy]); continue; }
          const hit = document.elementFromPoint(px, py);
          if (hit !== canvas && !hit?.closest?.(".dom-widget")) {
            misses.push([String(hit?.className ?? hit?.tagName).slice(0, 50), fx, fy]);
          }
        }
      }
      return { id: node.id, type: node.type, title: node.title, rect: [x0, y0, x1, y1].map(Math.round), graph: [bx, by, bw, bh], misses };
    });
    const overlaps = [];
    for (const a of nodes) for (const b of nodes) {
      if (a.id < b.id && a.graph[0] < b.graph[0] + b.graph[2] && b.graph[0] < a.graph[0] + a.graph[2]
          && a.graph[1] < b.graph[1] + b.graph[3] && b.graph[1] < a.graph[1] + a.graph[3]) overlaps.push([a.id, b.id]);
    }
    return { nodes, overlaps, scale, lowQuality: !!app.canvas.low_quality };
  });
}

// Whether AcT Load's combo shows its whole file name: label + value + arrows fit in the widget's width.
async function loadNameFits(page) {
  return page.evaluate(() => {
    const node = window.app.graph.nodes.find((n) => n.type === "ActSteerLoad");
    const widget = node?.widgets?.find((w) => w.name === "transport_name");
    if (!widget) return { fits: false, why: "no AcT Load node" };
    const ctx = document.createElement("canvas").getContext("2d");
    ctx.font = `${LiteGraph.NODE_SUBTEXT_SIZE ?? 12}px ${LiteGraph.NODE_FONT ?? "Arial"}`;
    const needed = ctx.measureText(String(widget.label ?? widget.name)).width + ctx.measureText(String(widget.value)).width
      + 2 * 15 + 2 * 20 + 10; // margins and the two arrows
    return { fits: needed <= node.size[0], needed: Math.round(needed), width: node.size[0], value: widget.value };
  });
}

async function queueAndWait(page, mutate, arg) {
  await page.evaluate(mutate, arg); // throws (and the check fails) when the graph lacks the node to change
  const answer = page.waitForResponse((r) => r.url().endsWith("/api/prompt") && r.request().method() === "POST",
                                      { timeout: 60000 });
  await page.getByRole("button", { name: "Run", exact: true }).first().click();
  const response = await answer;
  await page.waitForTimeout(1500);
  return { status: response.status(), body: await response.json().catch(() => null) };
}

async function serverCounts(page) {
  return page.evaluate(async () => {
    const history = await (await fetch("/api/history")).json();
    const queue = await (await fetch("/api/queue")).json();
    return { history: Object.keys(history).length, running: queue.queue_running.length, pending: queue.queue_pending.length };
  });
}

async function nodeText(page, type) {
  return page.evaluate((t) => {
    const node = window.app.graph.nodes.find((n) => n.type === t);
    const widget = node?.widgets?.find((w) => w.name === "actsteer_result");
    return widget ? String(widget.value ?? "") : null;
  }, type);
}

async function checkOpen() {
  for (const [width, height] of VIEWPORTS) {
    for (const title of TEMPLATES) {
      const { page, close } = await newPage(width, height);
      try {
        await openTemplate(page, title);
        const shot = path.join(OUT, `open-${slug(title)}-${width}x${height}.png`);
        await page.screenshot({ path: shot });
        const seen = await visibility(page);
        const hidden = seen.nodes.filter((n) => n.misses.length).map((n) => ({ type: n.type, title: n.title, rect: n.rect, misses: n.misses.slice(0, 4) }));
        record("open", `${title} at ${width}x${height}`, !hidden.length && !seen.overlaps.length,
               { hidden, overlaps: seen.overlaps, scale: +seen.scale.toFixed(3), lowQuality: seen.lowQuality, shot });
        if (title.includes("sweep") && width === VIEWPORTS[0][0] && height === VIEWPORTS[0][1]) {
          const fits = await loadNameFits(page);
          record("open", `AcT Load shows its whole file name (${title})`, fits.fits, fits);
        }
      } catch (error) {
        record("open", `${title} at ${width}x${height}`, false, { error: String(error).slice(0, 300) });
      } finally { await close(); }
    }
  }
}

async function checkFailFast() {
  const [width, height] = VIEWPORTS[0];
  const cases = [
    ["AcT SDXL learn and apply style", "ActSteerSave", "filename", "../outside", /Unsafe transport file name/],
    ["AcT FLUX remove a concept", "ActSteerSave", "filename", "con", /Windows reserves/],
    ["AcT SDXL strength sweep", "ActSteerLoad", "transport_name", "missing.safetensors", /No transport file 'missing.safetensors'/],
  ];
  for (const [title, type, widgetName, value, reason] of cases) {
    const { page, close } = await newPage(width, height);
    try {
      await openTemplate(page, title);
      const before = await serverCounts(page);
      const answer = await queueAndWait(page, ([t, w, v]) => {
        const node = window.app.graph.nodes.find((n) => n.type === t);
        if (!node) throw new Error(`this workflow has no ${t} node`);
        node.widgets.find((x) => x.name === w).value = v;
      }, [type, widgetName, value]);
      await page.waitForTimeout(1500);
      const after = await serverCounts(page);
      const text = await nodeText(page, type);
      const dialog = await page.locator(".p-dialog").allInnerTexts().catch(() => []);
      await page.screenshot({ path: path.join(OUT, `failfast-${slug(title)}-dialog.png`) });
      await page.keyboard.press("Escape"); // close the error dialog: the reason stays on the node
      await page.waitForTimeout(500);
      const shot = path.join(OUT, `failfast-${slug(title)}.png`);
      await page.screenshot({ path: shot });
      const refused = answer.status === 400 && after.history === before.history && !after.running && !after.pending;
      record("failfast", `${title}: ${widgetName} = ${value} is refused before anything runs`, refused,
             { status: answer.status, before, after, node_errors: Object.keys(answer.body?.node_errors ?? {}), shot });
      record("failfast", `${title}: the reason shows on ${type}`, reason.test(text ?? ""),
             { text, dialog: dialog.map((d) => d.slice(0, 300)) });
    } catch (error) {
      record("failfast", `${title}: ${widgetName} = ${value}`, false, { error: String(error).slice(0, 300) });
    } finally { await close(); }
  }
}

async function checkInputs() {
  const [width, height] = VIEWPORTS[0];
  const { page, close } = await newPage(width, height);
  try {
    await openTemplate(page, "AcT SDXL learn and apply style");
    const answer = await queueAndWait(page, () => {
      const node = window.app.graph.nodes.find((n) => n.type === "ActSteerLearn");
      node.widgets.find((w) => w.name === "source_prompts").value = "just one prompt";
    });
    const state = await page.evaluate(() => {
      const node = window.app.graph.nodes.find((n) => n.type === "ActSteerLearn");
      const errors = window.app.lastNodeErrors?.[String(node.id)]?.errors ?? [];
      return { inputs: errors.map((e) => e.extra_info?.input_name),
               ringed: node.inputs.filter((i) => i.hasErrors).map((i) => i.name) };
    });
    const text = await nodeText(page, "ActSteerLearn");
    await page.keyboard.press("Escape");
    await page.waitForTimeout(500);
    const shot = path.join(OUT, "inputs-learn-one-source-prompt.png");
    await page.screenshot({ path: shot });
    const ok = answer.status === 400 && state.inputs.length > 0 && state.inputs.every((n) => n === "source_prompts")
      && !state.ringed.includes("target_prompts") && /source_prompts/.test(text ?? "");
    record("inputs", "one source prompt: the error stays on source_prompts and shows on Learn", ok, { ...state, text, shot });
  } finally { await close(); }
}

async function checkLoad() {
  const [width, height] = VIEWPORTS[0];
  const { page, close } = await newPage(width, height);
  try {
    await openTemplate(page, "AcT SDXL strength sweep");
    // run only AcT Load (plus a Save to give it an output): no model is needed for that
    const saveId = await page.evaluate(() => {
      const load = window.app.graph.nodes.find((n) => n.type === "ActSteerLoad");
      const save = LiteGraph.createNode("ActSteerSave");
      save.pos = [1800, 0]; // out of the way (off screen): only the Load node is looked at
      window.app.graph.add(save);
      save.widgets.find((w) => w.name === "filename").value = "browser_check_copy";
      load.connect(0, save, 0);
      return save.id;
    });
    await page.evaluate((id) => window.app.queuePrompt(0, 1, [String(id)]), saveId);
    await page.waitForFunction(() => {
      const node = window.app.graph.nodes.find((n) => n.type === "ActSteerLoad");
      return String(node?.widgets?.find((w) => w.name === "actsteer_result")?.value ?? "").length > 0;
    }, null, { timeout: 120000 }).catch(() => null);
    const text = await nodeText(page, "ActSteerLoad");
    const drawn = await page.evaluate(() => {
      const node = window.app.graph.nodes.find((n) => n.type === "ActSteerLoad");
      const box = node?.widgets?.find((w) => w.name === "actsteer_result")?.element;
      if (!box) return false;
      const r = box.getBoundingClientRect();
      const hit = document.elementFromPoint(r.x + r.width / 2, r.y + r.height / 2);
      return r.width > 40 && r.height > 10 && (hit === box || box.contains(hit));
    });
    const shot = path.join(OUT, "load-summary.png");
    await page.screenshot({ path: shot });
    record("load", "AcT Load draws its summary after it ran", /layers, .* learned on/.test(text ?? "") && drawn,
           { text, drawn, shot });
  } finally { await close(); }
}

async function checkUnit() {
  const [width, height] = VIEWPORTS[0];
  const { page, close } = await newPage(width, height);
  try {
    const out = await page.evaluate(async () => {
      const m = await import("/extensions/actsteer/js/node_errors.js");
      const error = (input, message) => ({ type: "custom_validation_failed", message: "Custom validation failed for node",
                                           details: `${input} - ${message}`, extra_info: { input_name: input } });
      const source = "Need at least 2 source prompts in source_prompts (one per line)";
      const schedule = "collect_steps (30) is more than steps (20)";
      const errors = {
        "2": { class_type: "ActSteerLearn", dependent_outputs: [], errors: [error("source_prompts", source),
                                                                          error("target_prompts", source)] },
        "3": { class_type: "ActSteerLearn", dependent_outputs: [], errors: ["source_prompts", "steps", "collect_steps"]
                 .map((i) => error(i, schedule)) },
        "4": { class_type: "ActSteerApply", dependent_outputs: [], errors: [error("strength", "something general"),
                                                                          error("layers", "something general")] },
        "5": { class_type: "KSampler", dependent_outputs: [], errors: [error("seed", "x"), error("steps", "x")] },
      };
      m.attributeErrors(errors);
      const names = (id) => errors[id].errors.map((e) => e.extra_info.input_name);
      return { learn: names("2"), schedule: names("3"), general: names("4"), core: names("5"),
               text: m.errorText(errors["2"]), mentions: [m.mentions("collect_steps (3)", "steps"), m.mentions("MODEL is", "model")] };
    });
    const ok = JSON.stringify(out.learn) === '["source_prompts"]' && JSON.stringify(out.schedule) === '["steps","collect_steps"]'
      && out.general.length === 2 && out.core.length === 2 && out.text.startsWith("Need at least 2 source prompts")
      && out.mentions[0] === false && out.mentions[1] === true;
    record("unit", "node_errors.js keeps each message on the inputs it names", ok, out);
  } finally { await close(); }
}

const checks = { open: checkOpen, failfast: checkFailFast, inputs: checkInputs, load: checkLoad, unit: checkUnit };
for (const [name, run] of Object.entries(checks)) {
  if (ONLY && !ONLY.has(name)) continue;
  try { await run(); } catch (error) { record(name, "ran to the end", false, { error: String(error).slice(0, 500) }); }
}
fs.writeFileSync(path.join(OUT, "report.json"), JSON.stringify(results, null, 1));
const failed = results.filter((r) => !r.ok).length;
console.log(`${results.length - failed} ok, ${failed} failed; screenshots and report.json in ${OUT}`);
process.exit(failed ? 1 : 0);
