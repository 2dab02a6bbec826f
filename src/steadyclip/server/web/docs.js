// Renders /openapi.json as a readable reference, entirely locally (FastAPI's /docs would need a CDN).
"use strict";

(async function () {
  const root = document.getElementById("api");
  let spec;
  try {
    spec = await (await fetch("/openapi.json")).json();
  } catch (e) {
    root.textContent = "Could not load /openapi.json: " + e;
    return;
  }
  const schemas = (spec.components && spec.components.schemas) || {};

  function el(tag, cls, text) {
    const n = document.createElement(tag);
    if (cls) n.className = cls;
    if (text !== undefined) n.textContent = text;
    return n;
  }

  function resolve(schema) {
    let s = schema || {};
    for (let i = 0; i < 5 && s.$ref; i++) s = schemas[s.$ref.split("/").pop()] || {};
    return s;
  }

  function typeOf(s) {
    s = resolve(s);
    if (s.anyOf) return s.anyOf.map(typeOf).join(" | ");
    if (s.type === "array") return typeOf(s.items) + "[]";
    if (s.enum) return s.enum.map((v) => JSON.stringify(v)).join(" | ");
    if (s.format === "binary") return "file";
    return s.type || s.title || "object";
  }

  function fieldsTable(schema) {
    const s = resolve(schema);
    const props = s.properties || {};
    const required = new Set(s.required || []);
    const table = el("table", "fields");
    for (const [name, p] of Object.entries(props)) {
      const tr = el("tr");
      const n = el("td");
      n.appendChild(el("code", "", name));
      if (required.has(name)) n.appendChild(el("span", "req", " required"));
      tr.append(n, el("td", "type", typeOf(p)), el("td", "", (resolve(p).description || p.description || "")));
      table.appendChild(tr);
    }
    return table;
  }

  root.replaceChildren();
  // Descriptions use `backticks` for code; show those as <code>, everything else as plain text.
  function prose(tag, cls, text) {
    const node = el(tag, cls);
    String(text).split("`").forEach((part, i) => node.appendChild(i % 2 ? el("code", "", part) : document.createTextNode(part)));
    return node;
  }

  if (spec.info && spec.info.description) root.appendChild(prose("p", "intro", spec.info.description));
  for (const [path, ops] of Object.entries(spec.paths || {})) {
    for (const [method, op] of Object.entries(ops)) {
      const card = el("section", "panel endpoint");
      const head = el("h2");
      head.append(el("span", "method " + method, method.toUpperCase()), el("code", "path", path));
      card.appendChild(head);
      if (op.summary) card.appendChild(el("p", "summary", op.summary));
      if (op.description) card.appendChild(prose("p", "desc", op.description));
      const body = op.requestBody && op.requestBody.content;
      if (body) {
        for (const [ctype, media] of Object.entries(body)) {
          card.appendChild(el("h3", "", "Request body: " + ctype));
          card.appendChild(fieldsTable(media.schema));
        }
      }
      const responses = el("ul", "responses");
      for (const [code, r] of Object.entries(op.responses || {})) {
        const li = el("li");
        li.append(el("code", "code c" + code[0], code), document.createTextNode(" " + (r.description || "")));
        responses.appendChild(li);
      }
      card.append(el("h3", "", "Responses"), responses);
      root.appendChild(card);
    }
  }
})();
