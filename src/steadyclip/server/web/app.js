// steadyclip web page: upload an image, type labels, see probabilities and the provenance.
// Plain JS, no dependencies, nothing loaded from outside this server.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const form = $("classify-form");
  const fileInput = $("file");
  const dropzone = $("dropzone");
  const preview = $("preview");
  const labelsBox = $("labels");
  const submitBtn = $("submit");
  const againBtn = $("again");
  const tokenInput = $("token");

  let imageFile = null;     // the File (or Blob) to classify
  let lastRequest = null;   // {file, labels, templates} of the last successful request
  let lastAnswer = null;    // its JSON, to compare a re-run bit for bit
  let modelLabels = [];

  // ---- helpers -------------------------------------------------------------------------
  function authHeaders() {
    const t = tokenInput.value.trim();
    return t ? { Authorization: "Bearer " + t } : {};
  }

  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "text") node.textContent = v;
      else if (k === "class") node.className = v;
      else node.setAttribute(k, v);
    }
    for (const c of children || []) node.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    return node;
  }

  function short(hash) { return hash ? String(hash).slice(0, 12) : "?"; }

  function showError(type, message) {
    const box = $("error");
    box.replaceChildren(el("b", { text: type }), el("span", { text: message }));
    box.classList.remove("hidden");
  }

  function clearError() { $("error").classList.add("hidden"); }

  async function readError(resp) {
    try {
      const doc = await resp.json();
      if (doc && doc.error) return [doc.error.type, doc.error.message];
    } catch (e) { /* not JSON */ }
    return ["HTTP " + resp.status, resp.statusText || "request failed"];
  }

  function currentLabels() {
    return labelsBox.value.split("\n").map((s) => s.trim()).filter((s) => s.length > 0);
  }

  function updateSubmit() {
    submitBtn.disabled = !(imageFile && currentLabels().length > 0);
  }

  // ---- model card ----------------------------------------------------------------------
  async function loadModel() {
    const card = $("model-card");
    let resp;
    try {
      resp = await fetch("/v1/model", { headers: authHeaders() });
    } catch (e) {
      card.replaceChildren(el("span", { class: "muted", text: "Server not reachable: " + e }));
      return;
    }
    if (resp.status === 401) {
      $("token-section").classList.remove("hidden");
      card.replaceChildren(el("span", { class: "muted", text: "This server needs an access token - paste it below." }));
      return;
    }
    if (!resp.ok) {
      const [t, m] = await readError(resp);
      card.replaceChildren(el("span", { class: "muted", text: t + ": " + m }));
      return;
    }
    const doc = await resp.json();
    const m = doc.model || {};
    const p = doc.provenance || {};
    card.replaceChildren(
      el("span", {}, ["model ", el("b", { text: m.model_id || "?" })]),
      el("span", { title: m.weights_sha256 || "" }, ["weights ", el("code", { text: short(m.weights_sha256) })]),
      el("span", { title: m.fingerprint || "", id: "model-fingerprint" }, ["fingerprint ", el("code", { text: short(m.fingerprint) })]),
      el("span", {}, ["profile ", el("b", { text: (p.profile || "?") + " / " + (p.precision || "?") })]),
      el("span", {}, ["threads ", el("b", { text: String(p.threads ?? "?") })]),
    );
    modelLabels = doc.suggested_labels || [];
    if (modelLabels.length) {
      if (!labelsBox.value.trim()) labelsBox.value = modelLabels.slice(0, 6).join("\n");
      const fill = $("fill-labels");
      fill.textContent = "use all " + modelLabels.length + " labels this model was trained on";
      fill.classList.remove("hidden");
    }
    updateSubmit();
  }

  // ---- image selection -----------------------------------------------------------------
  function setImage(file) {
    if (!file) return;
    if (file.type && !file.type.startsWith("image/")) {
      showError("Not an image", file.name + " is " + file.type + "; choose a PNG, JPEG, WebP, ... file.");
      return;
    }
    imageFile = file;
    clearError();
    const url = URL.createObjectURL(file);
    preview.onload = () => URL.revokeObjectURL(url);
    preview.src = url;
    preview.classList.remove("hidden");
    $("drop-text").textContent = file.name + " - drop or click to change";
    updateSubmit();
  }

  fileInput.addEventListener("change", () => setImage(fileInput.files[0]));
  dropzone.addEventListener("dragover", (e) => { e.preventDefault(); dropzone.classList.add("over"); });
  dropzone.addEventListener("dragleave", () => dropzone.classList.remove("over"));
  dropzone.addEventListener("drop", (e) => {
    e.preventDefault();
    dropzone.classList.remove("over");
    if (e.dataTransfer && e.dataTransfer.files.length) setImage(e.dataTransfer.files[0]);
  });
  labelsBox.addEventListener("input", updateSubmit);
  $("fill-labels").addEventListener("click", () => { labelsBox.value = modelLabels.join("\n"); updateSubmit(); });
  tokenInput.addEventListener("change", loadModel);

  // ---- classify ------------------------------------------------------------------------
  async function classify(req) {
    const body = new FormData();
    body.append("image", req.file, req.file.name || "image");
    for (const label of req.labels) body.append("labels", label);
    body.append("templates", req.templates);
    body.append("top_k", String(req.labels.length));
    const resp = await fetch("/v1/classify", { method: "POST", body, headers: authHeaders() });
    if (!resp.ok) {
      const [t, m] = await readError(resp);
      if (resp.status === 401) $("token-section").classList.remove("hidden");
      throw Object.assign(new Error(m), { type: t });
    }
    return resp.json();
  }

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const req = { file: imageFile, labels: currentLabels(), templates: $("templates").value };
    submitBtn.disabled = true;
    submitBtn.textContent = "Classifying...";
    clearError();
    try {
      const doc = await classify(req);
      lastRequest = req;
      lastAnswer = doc;
      render(doc);
      againBtn.classList.remove("hidden");
      $("compare").classList.add("hidden");
    } catch (err) {
      showError(err.type || "Error", err.message);
    } finally {
      submitBtn.textContent = "Classify";
      updateSubmit();
    }
  });

  againBtn.addEventListener("click", async () => {
    if (!lastRequest) return;
    const out = $("compare");
    againBtn.disabled = true;
    try {
      const doc = await classify(lastRequest);
      // JSON numbers round-trip exactly, so equal text means bitwise-equal probabilities.
      const a = JSON.stringify([lastAnswer.results[0].probs, lastAnswer.provenance]);
      const b = JSON.stringify([doc.results[0].probs, doc.provenance]);
      out.className = "compare " + (a === b ? "ok" : "bad");
      out.textContent = a === b
        ? "Ran again: every probability is bit-for-bit identical, same weights and settings."
        : "Ran again: the answer DIFFERS - this server is not reproducible; check its profile and /readyz.";
    } catch (err) {
      out.className = "compare bad";
      out.textContent = (err.type || "Error") + ": " + err.message;
    } finally {
      out.classList.remove("hidden");
      againBtn.disabled = false;
    }
  });

  // ---- rendering -----------------------------------------------------------------------
  function render(doc) {
    const res = doc.results[0];
    const prov = doc.provenance;
    const sorted = Object.entries(res.probs).sort((a, b) => b[1] - a[1]);
    $("top-label").textContent = sorted[0][0];

    const bars = $("bars");
    bars.replaceChildren();
    sorted.slice(0, 10).forEach(([label, p], i) => {
      const fill = el("div", { class: "fill" });
      const li = el("li", { class: i === 0 ? "first" : "", "data-label": label, "data-prob": String(p) }, [
        el("span", { class: "name", title: label, text: label }),
        el("div", { class: "track" }, [fill]),
        el("span", { class: "pct", text: p < 0.00001 ? "<0.001%" : (100 * p).toFixed(p >= 0.001 ? 1 : 3) + "%" }),
      ]);
      bars.appendChild(li);
      requestAnimationFrame(() => { fill.style.width = Math.max(0.5, 100 * p).toFixed(2) + "%"; });
    });
    if (sorted.length > 10) bars.appendChild(el("li", { class: "muted small", text: "+ " + (sorted.length - 10) + " more labels" }));

    const badge = $("badge");
    const strict = prov.profile === "strict" && prov.precision === "fp32";
    badge.className = "badge " + (strict ? "ok" : "warn");
    badge.textContent = strict ? "\u2713 Reproducible" : "\u26A0 Not bitwise reproducible";
    badge.title = (strict
      ? "Strict profile: the same image and labels give bit-for-bit this answer on this machine and software stack, "
        + "from the CLI, the library or this server. "
      : "The '" + prov.profile + "' profile trades exact reproducibility for speed. ")
      + "weights " + short(prov.weights_sha256) + ", fingerprint " + short(prov.fingerprint)
      + ", " + prov.threads + " thread(s), micro-batch " + prov.micro_batch + " (" + prov.batch_path + ")";

    const rows = [
      ["model", prov.model_id + " (" + prov.arch + ")"],
      ["weights sha256", prov.weights_sha256],
      ["state fingerprint", prov.fingerprint],
      ["profile", prov.profile + ", " + prov.precision + (prov.deterministic ? ", deterministic algorithms" : "")],
      ["device / threads", prov.device + " / " + prov.threads],
      ["image micro-batch", prov.micro_batch + " (" + prov.batch_path + ")"],
      ["text micro-batch", prov.text_micro_batch + " (" + prov.text_batch_path + "; " + prov.text_buckets + ")"],
      ["templates", (prov.template_set || "?") + " " + short(prov.template_sha256)],
      ["versions", Object.entries(prov.versions || {}).map(([k, v]) => k + " " + v).join(", ")],
    ];
    $("provenance-table").replaceChildren(...rows.map(([k, v]) =>
      el("tr", {}, [el("td", { text: k }), el("td", {}, [el("code", { text: String(v) })])])));
    $("result").classList.remove("hidden");
  }

  loadModel();
})();
