// qdserve playground. Plain browser JavaScript, no dependencies, no build step.
//
// It talks to the service's own API with relative URLs:
//   GET  v1/models                 variants and declared LoRA adapters
//   POST v1/images/generations     JSON, stream: true  -> OpenAI's image_generation.* events
//   POST v1/images/edits           multipart, stream    -> image_edit.* events
// and shows each partial image as it arrives, then the final images with the timings and
// usage the completed events carry. The API key (QDS_API_KEYS) lives in this tab only
// (sessionStorage), sent as `Authorization: Bearer <key>`.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const KEY_STORE = "qdserve.playground.key";

  const state = {
    models: [],
    controller: null, // AbortController of the running request
    edit: null, // {blob, name, width, height}: the image to edit
    maskFile: null, // an uploaded mask that could not be shown on the canvas (sent as is)
    painted: false,
    drawing: null, // last pointer position while painting
  };

  // -- small helpers -----------------------------------------------------------------------
  function authHeaders() {
    const key = $("key").value.trim();
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  function say(text, kind = "") {
    const box = $("message");
    box.textContent = text;
    box.className = `message ${kind}`;
  }

  function el(tag, attrs = {}, text = "") {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text) node.textContent = text;
    return node;
  }

  async function errorText(response) {
    try {
      const body = await response.json();
      if (body && body.error) return `${response.status}: ${body.error.message}`;
      return `${response.status}: ${JSON.stringify(body)}`;
    } catch {
      return `${response.status} ${response.statusText}`;
    }
  }

  function mode() {
    return $("mode-edit").checked ? "edit" : "generate";
  }

  // -- server state ------------------------------------------------------------------------
  async function checkReady() {
    const status = $("server-status");
    try {
      const r = await fetch("readyz", { cache: "no-store" });
      const body = await r.json();
      status.textContent = r.ok ? `ready: ${body.model}` : `not ready: ${body.reason}`;
      status.className = r.ok ? "status ok" : "status wait";
      if (!r.ok) setTimeout(checkReady, 2000);
      else loadModels();
    } catch (err) {
      status.textContent = `server unreachable (${err.message})`;
      status.className = "status bad";
      setTimeout(checkReady, 3000);
    }
  }

  async function loadModels() {
    let r;
    try {
      r = await fetch("v1/models", { headers: authHeaders(), cache: "no-store" });
    } catch (err) {
      say(`cannot list models: ${err.message}`, "error");
      return;
    }
    if (r.status === 401) {
      say("This server needs an API key: type it above (it stays in this tab).", "error");
      return;
    }
    if (!r.ok) {
      say(`cannot list models: ${await errorText(r)}`, "error");
      return;
    }
    const body = await r.json();
    state.models = body.data || [];
    const select = $("model");
    const chosen = select.value;
    select.replaceChildren();
    for (const card of state.models) {
      const label = [card.id, card.default ? "default" : "", card.loaded ? "" : "not loaded"]
        .filter(Boolean)
        .join(" · ");
      const option = el("option", { value: card.default ? "" : card.id }, label);
      select.append(option);
    }
    if ([...select.options].some((o) => o.value === chosen)) select.value = chosen;
    showLoras();
    if ($("message").classList.contains("error")) say("");
  }

  function currentCard() {
    const id = $("model").value;
    return state.models.find((c) => (id ? c.id === id : c.default)) || state.models[0];
  }

  function showLoras() {
    const box = $("loras");
    const card = currentCard();
    const loras = (card && card.loras) || [];
    box.replaceChildren();
    if (!loras.length) {
      box.append(el("small", {}, "none declared (QDS_LORAS)"));
      return;
    }
    for (const lora of loras) {
      const row = el("div", { class: "lora-row" });
      const check = el("input", { type: "checkbox", id: `lora-${lora.name}`, "data-lora": lora.name });
      const label = el("label", { for: `lora-${lora.name}` }, lora.name);
      const scale = el("input", {
        type: "number", min: "-4", max: "4", step: "0.1", value: "1",
        id: `lora-scale-${lora.name}`, "aria-label": `${lora.name} scale`,
      });
      const info = el("small", {}, lora.state === "loaded" ? `rank ${lora.rank ?? "?"}` : lora.state);
      if (lora.state === "unsupported") {
        check.disabled = true;
        info.title = lora.reason || "";
      }
      row.append(check, label, scale, info);
      box.append(row);
    }
  }

  function chosenLoras() {
    const out = [];
    for (const check of document.querySelectorAll("#loras input[type=checkbox]")) {
      if (!check.checked) continue;
      const name = check.dataset.lora;
      out.push({ name, scale: Number($(`lora-scale-${name}`).value || 1) });
    }
    return out;
  }

  // -- the request ---------------------------------------------------------------------------
  function numberField(id) {
    const value = $(id).value.trim();
    return value === "" ? undefined : Number(value);
  }

  function commonFields() {
    const fields = {
      prompt: $("prompt").value,
      n: numberField("n") ?? 1,
      stream: true,
      partial_images: numberField("partials") ?? 0,
      response_format: "b64_json",
      output_format: "png",
    };
    const optional = {
      negative_prompt: $("negative").value.trim() || undefined,
      model: $("model").value || undefined,
      size: $("size").value.trim() || undefined,
      num_inference_steps: numberField("steps"),
      seed: numberField("seed"),
      guidance_scale: numberField("guidance"),
    };
    for (const [k, v] of Object.entries(optional)) if (v !== undefined) fields[k] = v;
    const loras = chosenLoras();
    if (loras.length) fields.lora = loras;
    return fields;
  }

  async function buildRequest() {
    const fields = commonFields();
    if (mode() === "generate") {
      return {
        url: "v1/images/generations",
        init: {
          method: "POST",
          headers: { "Content-Type": "application/json", ...authHeaders() },
          body: JSON.stringify(fields),
        },
      };
    }
    if (!state.edit) throw new Error("choose an image to edit first");
    const form = new FormData();
    form.append("image", state.edit.blob, state.edit.name);
    const mask = await maskBlob();
    if (mask) form.append("mask", mask, "mask.png");
    const strength = numberField("strength");
    if (strength !== undefined) fields.strength = strength;
    for (const [k, v] of Object.entries(fields)) {
      form.append(k, typeof v === "object" ? JSON.stringify(v) : String(v));
    }
    return {
      url: "v1/images/edits",
      init: { method: "POST", headers: authHeaders(), body: form },
      mask,
    };
  }

  // The mask as sent, beside the results (transparent = the area the model redraws).
  async function showMaskSent(mask) {
    const box = $("mask-sent");
    if (!mask) {
      box.hidden = true;
      return;
    }
    const src = await new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result);
      reader.onerror = () => reject(reader.error);
      reader.readAsDataURL(mask);
    });
    box.querySelector("img").src = src;
    box.hidden = false;
  }

  // Server-sent events from a fetch() body: yields {event, data} with data parsed as JSON.
  async function* sseEvents(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let event = "message";
        const data = [];
        for (const line of block.split("\n")) {
          if (!line || line.startsWith(":")) continue;
          const colon = line.indexOf(":");
          const field = colon < 0 ? line : line.slice(0, colon);
          let text = colon < 0 ? "" : line.slice(colon + 1);
          if (text.startsWith(" ")) text = text.slice(1);
          if (field === "event") event = text;
          else if (field === "data") data.push(text);
        }
        if (data.length) yield { event, data: JSON.parse(data.join("\n")) };
      }
    }
  }

  // -- output --------------------------------------------------------------------------------
  function resultCells(n) {
    const results = $("results");
    results.replaceChildren();
    const cells = [];
    for (let i = 0; i < n; i++) {
      const figure = el("figure", { class: "result", "data-index": String(i), "data-state": "waiting" });
      const img = el("img", { class: "main", alt: `image ${i}` });
      const caption = el("figcaption", {}, "waiting…");
      const strip = el("div", { class: "strip", "aria-label": `partial images of image ${i}` });
      const use = el("button", { type: "button", class: "use", hidden: "" }, "Edit this image");
      use.addEventListener("click", () => useAsInput(img.src, i));
      figure.append(img, caption, strip, use);
      results.append(figure);
      cells.push({ figure, img, caption, strip, use });
    }
    return cells;
  }

  function logEvent(text) {
    $("events").append(el("li", {}, text));
  }

  function showStats(rows) {
    const body = $("stats-body");
    body.replaceChildren();
    for (const [name, value] of rows) {
      const tr = el("tr");
      tr.append(el("th", {}, name), el("td", {}, String(value)));
      body.append(tr);
    }
    $("stats").hidden = false;
  }

  function statsRows(done, clock) {
    const first = done[0];
    const t = first.timings || {};
    const u = first.usage || {};
    const rows = [
      ["model", first.model],
      ["backend", first.quant_type ? `${first.backend} (${first.quant_type})` : first.backend],
      ["seeds", done.map((d) => d.seed).join(", ")],
      ["queue", `${(t.queue_seconds ?? 0).toFixed(3)} s`],
      ["inference", `${(t.inference_seconds ?? 0).toFixed(3)} s`],
      ["encode", `${(t.encode_seconds ?? 0).toFixed(3)} s`],
      ["batch images", t.batch_images],
      ["tokens in (text / image)", `${u.input_tokens ?? "?"} (${u.input_tokens_details?.text_tokens ?? "?"} / ${u.input_tokens_details?.image_tokens ?? "?"})`],
      ["tokens out (image)", u.output_tokens ?? "?"],
      ["tokens total", u.total_tokens ?? "?"],
    ];
    if (clock.firstPartial !== null) rows.push(["first partial after", `${clock.firstPartial} ms`]);
    rows.push(["final after", `${clock.final} ms`]);
    return rows;
  }

  async function run(event) {
    event.preventDefault();
    if (state.controller) return;
    let request;
    try {
      request = await buildRequest();
    } catch (err) {
      say(err.message, "error");
      return;
    }
    const n = commonFields().n;
    await showMaskSent(request.mask);
    const cells = resultCells(n);
    $("events").replaceChildren();
    $("stats").hidden = true;
    say(mode() === "edit" ? "editing…" : "generating…", "busy");
    const controller = new AbortController();
    state.controller = controller;
    $("run").disabled = true;
    $("cancel").disabled = false;
    const start = performance.now();
    const ms = () => Math.round(performance.now() - start);
    const clock = { firstPartial: null, final: null };
    const done = [];
    let partials = 0;
    try {
      const response = await fetch(request.url, { ...request.init, signal: controller.signal });
      if (!response.ok) {
        say(await errorText(response), "error");
        for (const c of cells) c.figure.remove();
        return;
      }
      for await (const { event: name, data } of sseEvents(response)) {
        const i = data.index ?? 0;
        const cell = cells[i];
        if (name.endsWith(".partial_image")) {
          if (clock.firstPartial === null) clock.firstPartial = ms();
          const src = `data:image/${data.output_format};base64,${data.b64_json}`;
          const label = `partial ${data.partial_image_index + 1} · step ${data.step}/${data.total_steps}`;
          cell.img.src = src;
          cell.figure.dataset.state = "partial";
          cell.caption.textContent = `${label} · seed ${data.seed}`;
          const thumb = el("img", { src, alt: label, title: label });
          cell.strip.append(thumb);
          partials += 1;
          say(`streaming… ${partials} partial image${partials > 1 ? "s" : ""} so far (+${ms()} ms)`, "busy");
          logEvent(`${name} image ${i} ${label} (+${ms()} ms)`);
        } else if (name.endsWith(".completed")) {
          cell.img.src = `data:image/${data.output_format};base64,${data.b64_json}`;
          cell.figure.dataset.state = "final";
          cell.figure.dataset.seed = String(data.seed);
          cell.caption.textContent = `final · seed ${data.seed}`;
          if (!cell.strip.childElementCount && commonFields().partial_images > 0) {
            // Edits (and pipelines without a step loop) run whole calls: no previews.
            cell.caption.textContent += " · no partial images from this pipeline";
          }
          cell.use.hidden = false;
          done.push(data);
          logEvent(`${name} image ${i} seed ${data.seed} (+${ms()} ms)`);
        } else if (name === "error") {
          const message = data.error ? data.error.message : JSON.stringify(data);
          logEvent(`error: ${message}`);
          say(`error: ${message}`, "error");
          return;
        }
      }
      clock.final = ms();
      if (done.length) {
        showStats(statsRows(done, clock));
        say(`${done.length} image${done.length > 1 ? "s" : ""} in ${clock.final} ms`, "ok");
      } else {
        say("the stream ended without an image", "error");
      }
    } catch (err) {
      say(err.name === "AbortError" ? "cancelled" : `failed: ${err.message}`, "error");
    } finally {
      state.controller = null;
      $("run").disabled = false;
      $("cancel").disabled = true;
    }
  }

  // -- edit input and mask -------------------------------------------------------------------
  async function setEditImage(blob, name) {
    const bitmap = await createImageBitmap(blob);
    state.edit = { blob, name, width: bitmap.width, height: bitmap.height };
    $("edit-source").textContent = `input: ${name}, ${bitmap.width}x${bitmap.height}`;
    state.maskFile = null;
    const image = $("edit-canvas");
    const mask = $("mask-canvas");
    for (const canvas of [image, mask]) {
      canvas.width = bitmap.width;
      canvas.height = bitmap.height;
    }
    image.getContext("2d").drawImage(bitmap, 0, 0);
    clearMask();
    // Shown at least 256 px on its long side (small images scaled up, pixels kept sharp).
    const scale = Math.max(1, Math.floor(256 / Math.max(bitmap.width, bitmap.height)));
    const shown = Math.min(384, Math.max(bitmap.width, bitmap.height) * scale);
    const factor = shown / Math.max(bitmap.width, bitmap.height);
    const wrap = $("canvas-wrap");
    wrap.style.width = `${Math.round(bitmap.width * factor)}px`;
    wrap.style.height = `${Math.round(bitmap.height * factor)}px`;
    wrap.hidden = false;
    $("brush").value = String(Math.max(1, Math.round(Math.min(bitmap.width, bitmap.height) / 6)));
  }

  // A data: URL's bytes (fetch() would be a connection, which the page's policy limits to
  // this server).
  function dataUrlBlob(src) {
    const [head, data] = src.split(",", 2);
    const type = head.slice(5).split(";")[0];
    const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
    return new Blob([bytes], { type });
  }

  async function useAsInput(src, index) {
    const blob = dataUrlBlob(src);
    $("mode-edit").checked = true;
    applyMode();
    await setEditImage(blob, `result-${index}.png`);
    $("edit-image").value = "";
    say("The image is the edit input now: paint the area to change, then Edit.", "ok");
  }

  function clearMask() {
    const mask = $("mask-canvas");
    mask.getContext("2d").clearRect(0, 0, mask.width, mask.height);
    state.painted = false;
    state.maskFile = null;
  }

  function canvasPoint(event) {
    const canvas = $("mask-canvas");
    const rect = canvas.getBoundingClientRect();
    return {
      x: ((event.clientX - rect.left) * canvas.width) / rect.width,
      y: ((event.clientY - rect.top) * canvas.height) / rect.height,
    };
  }

  function paint(from, to) {
    const ctx = $("mask-canvas").getContext("2d");
    const width = Math.max(1, Number($("brush").value) || 1);
    ctx.strokeStyle = ctx.fillStyle = "rgb(255, 0, 96)";
    ctx.lineWidth = width;
    ctx.lineCap = ctx.lineJoin = "round";
    ctx.beginPath();
    ctx.moveTo(from.x, from.y);
    ctx.lineTo(to.x, to.y);
    ctx.stroke();
    ctx.beginPath();
    ctx.arc(to.x, to.y, width / 2, 0, 2 * Math.PI);
    ctx.fill();
    state.painted = true;
    state.maskFile = null;
  }

  function startPaint(event) {
    if (!state.edit) return;
    event.preventDefault();
    $("mask-canvas").setPointerCapture(event.pointerId);
    const p = canvasPoint(event);
    state.drawing = p;
    paint(p, p);
  }

  function movePaint(event) {
    if (!state.drawing) return;
    const p = canvasPoint(event);
    paint(state.drawing, p);
    state.drawing = p;
  }

  function endPaint() {
    state.drawing = null;
  }

  // An uploaded mask of the image's size is shown on the canvas (its transparent pixels
  // painted) and can be touched up; another size is sent as it is (the server says why not).
  async function loadMaskFile(file) {
    if (!file) return;
    if (!state.edit) {
      say("choose the image first, then its mask", "error");
      $("edit-mask").value = "";
      return;
    }
    const bitmap = await createImageBitmap(file, { premultiplyAlpha: "none" });
    if (bitmap.width !== state.edit.width || bitmap.height !== state.edit.height) {
      clearMask();
      state.maskFile = file;
      say(`mask is ${bitmap.width}x${bitmap.height}, the image ${state.edit.width}x${state.edit.height}: sent as is`, "error");
      return;
    }
    const scratch = document.createElement("canvas");
    scratch.width = bitmap.width;
    scratch.height = bitmap.height;
    const sctx = scratch.getContext("2d");
    sctx.drawImage(bitmap, 0, 0);
    const pixels = sctx.getImageData(0, 0, bitmap.width, bitmap.height);
    const overlay = new ImageData(bitmap.width, bitmap.height);
    let any = false;
    for (let i = 0; i < pixels.data.length; i += 4) {
      if (pixels.data[i + 3] === 0) {
        overlay.data.set([255, 0, 96, 255], i);
        any = true;
      }
    }
    clearMask();
    $("mask-canvas").getContext("2d").putImageData(overlay, 0, 0);
    state.painted = any;
    if (!any) say("that mask has no transparent pixel: nothing would change", "error");
  }

  // The mask the API takes: the image's size, opaque where the image is kept, alpha 0 where
  // it was painted. Painted means any coverage (brush edges included), so the edit area is
  // exactly what was drawn over.
  async function maskBlob() {
    if (state.maskFile) return state.maskFile;
    if (!state.painted) return null;
    const canvas = $("mask-canvas");
    const { width, height } = canvas;
    const painted = canvas.getContext("2d").getImageData(0, 0, width, height).data;
    const out = new ImageData(width, height);
    for (let i = 0; i < painted.length; i += 4) {
      out.data.set([255, 255, 255, painted[i + 3] > 0 ? 0 : 255], i);
    }
    const scratch = document.createElement("canvas");
    scratch.width = width;
    scratch.height = height;
    scratch.getContext("2d").putImageData(out, 0, 0);
    return new Promise((resolve) => scratch.toBlob(resolve, "image/png"));
  }

  // -- wiring --------------------------------------------------------------------------------
  function applyMode() {
    const edit = mode() === "edit";
    $("edit-panel").hidden = !edit;
    $("run").textContent = edit ? "Edit" : "Generate";
  }

  function init() {
    const saved = sessionStorage.getItem(KEY_STORE);
    if (saved) $("key").value = saved;
    $("key").addEventListener("change", () => {
      const key = $("key").value.trim();
      if (key) sessionStorage.setItem(KEY_STORE, key);
      else sessionStorage.removeItem(KEY_STORE);
      loadModels();
    });
    $("model").addEventListener("change", showLoras);
    for (const radio of document.querySelectorAll("input[name=mode]")) {
      radio.addEventListener("change", applyMode);
    }
    $("form").addEventListener("submit", run);
    $("cancel").addEventListener("click", () => state.controller && state.controller.abort());
    $("edit-image").addEventListener("change", async () => {
      const file = $("edit-image").files[0];
      if (!file) return;
      try {
        await setEditImage(file, file.name);
        $("edit-mask").value = "";
        say("");
      } catch (err) {
        say(`cannot read that image: ${err.message}`, "error");
      }
    });
    $("edit-mask").addEventListener("change", () =>
      loadMaskFile($("edit-mask").files[0]).catch((err) => say(`cannot read that mask: ${err.message}`, "error")),
    );
    $("clear-mask").addEventListener("click", () => {
      clearMask();
      $("edit-mask").value = "";
    });
    const mask = $("mask-canvas");
    mask.addEventListener("pointerdown", startPaint);
    mask.addEventListener("pointermove", movePaint);
    mask.addEventListener("pointerup", endPaint);
    mask.addEventListener("pointercancel", endPaint);
    applyMode();
    checkReady();
  }

  init();
})();
