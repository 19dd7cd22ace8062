// drpo run report: renders the embedded run data (the #drpo-data JSON block) lazily.
// Model and user text is only ever inserted as text (textContent / text nodes), never as HTML.
(function () {
  "use strict";
  const started = performance.now();
  const DATA = JSON.parse(document.getElementById("drpo-data").textContent);
  const byId = (id) => document.getElementById(id);

  // h("div", {class: "x", onclick: f}, "text", child): an element; strings become text nodes.
  function h(tag, props, ...children) {
    const element = document.createElement(tag);
    if (props) {
      for (const [key, value] of Object.entries(props)) {
        if (value === null || value === undefined || value === false) continue;
        if (key === "class") element.className = value;
        else if (key.startsWith("on")) element.addEventListener(key.slice(2), value);
        else element.setAttribute(key, value === true ? "" : String(value));
      }
    }
    for (const child of children) {
      if (child === null || child === undefined || child === false) continue;
      element.append(child instanceof Node ? child : String(child));
    }
    return element;
  }
  const fixed = (value, digits) => (value === null || value === undefined ? "-" : Number(value).toFixed(digits));
  const rewardClass = (v) => (v >= 4.5 ? "r5" : v >= 3.5 ? "r4" : v >= 2.5 ? "r3" : "r2");
  // logprobs verdicts are expected values: two decimals; whole scores as they are
  const scoreText = (v) => (Number.isInteger(v) ? String(v) : fixed(v, 2));
  const utc = (t) => (t ? new Date(t * 1000).toISOString().replace("T", " ").slice(0, 19) : "-");

  // ------------------------------------------------------------------ the tree
  const nodes = DATA.nodes;
  const nodeById = new Map();
  const childrenOf = new Map();
  for (const node of nodes) {
    nodeById.set(node.id, node);
    childrenOf.set(node.id, []);
  }
  const roots = [];
  for (const node of nodes) {
    if (node.parent !== null && nodeById.has(node.parent)) childrenOf.get(node.parent).push(node);
    else roots.push(node);
  }
  const promptOf = (node) => node.diff.filter((part) => part[0] !== "-").map((part) => part[1]).join("");
  const bestPath = DATA.tree.best_path || [];
  const open = new Set(bestPath.slice(0, -1));
  let hidePruned = false;
  let selected = null;
  const treeBox = byId("tree");
  const rowOf = new Map();

  function statusTag(node) {
    const text = node.status === "kept" && node.rank !== null ? "kept #" + (node.rank + 1) : node.status;
    return h("span", { class: "tag " + node.status }, text);
  }

  function nodeRow(node) {
    const kids = childrenOf.get(node.id);
    const item = h("li", { class: "node " + node.status + (node.best ? " best" : ""), role: "treeitem", "data-node": node.id });
    const toggle = h("button", { type: "button", class: "toggle", "aria-label": "expand or collapse", disabled: kids.length === 0 }, kids.length ? "▸" : "·");
    toggle.addEventListener("click", (event) => {
      event.stopPropagation();
      setOpen(node, !open.has(node.id));
    });
    const aspects = h("span", { class: "aspects" });
    for (const [name, score] of node.aspects) {
      aspects.append(h("span", { class: "chip " + rewardClass(score), title: name }, name + " " + scoreText(score)));
    }
    let summary;
    if (node.parent === null) summary = (promptOf(node).split("\n").find((line) => line.trim()) || "").slice(0, 90);
    else if (node.same) summary = "(same prompt as parent)";
    else summary = "Δ+" + node.add + "/−" + node.del + " " + node.change;
    const label = h(
      "div",
      { class: "label", tabindex: "0", role: "button" },
      toggle,
      node.best ? h("span", { class: "star", title: "on the best path" }, "★") : null,
      h("span", { class: "nid" }, node.id),
      h("span", { class: "reward " + rewardClass(node.reward), title: "reward of this node's answer" }, fixed(node.reward, 2)),
      node.parent !== null ? h("span", { class: "score", title: "path score (what the beam ranks by)" }, "path " + fixed(node.score, 2)) : null,
      statusTag(node),
      node.skipped ? h("span", { class: "tag skipped", title: "no rewrite: the parent's prompt carried over" }, "skip") : null,
      node.failed ? h("span", { class: "tag failed", title: node.error || "" }, "judge failed") : null,
      aspects,
      h("span", { class: "summary" }, summary)
    );
    label.addEventListener("click", () => select(node.id));
    label.addEventListener("keydown", (event) => {
      if (event.key === "Enter" || event.key === " ") {
        event.preventDefault();
        select(node.id);
      } else if (event.key === "ArrowRight" && kids.length) setOpen(node, true);
      else if (event.key === "ArrowLeft") setOpen(node, false);
    });
    item.append(label);
    rowOf.set(node.id, item);
    if (open.has(node.id)) fill(item, node);
    if (selected === node.id) item.classList.add("selected");
    return item;
  }

  function fill(item, node) {
    // Children are built the first time a node is opened (and rebuilt on a filter change).
    let list = item.querySelector(":scope > ul");
    if (!list) {
      list = h("ul", { role: "group" });
      for (const child of childrenOf.get(node.id)) {
        if (hidePruned && child.status === "pruned") continue;
        list.append(nodeRow(child));
      }
      item.append(list);
    }
    item.classList.add("open");
    item.setAttribute("aria-expanded", "true");
    const toggle = item.querySelector(":scope > .label > .toggle");
    if (toggle) toggle.textContent = "▾";
  }

  function setOpen(node, value) {
    const item = rowOf.get(node.id);
    if (value) {
      open.add(node.id);
      if (item) fill(item, node);
    } else {
      open.delete(node.id);
      if (item) {
        item.classList.remove("open");
        item.setAttribute("aria-expanded", "false");
        const toggle = item.querySelector(":scope > .label > .toggle");
        if (toggle && childrenOf.get(node.id).length) toggle.textContent = "▸";
      }
    }
  }

  function renderTree() {
    rowOf.clear();
    const list = h("ul", { class: "tree", id: "tree-root" });
    for (const root of roots) list.append(nodeRow(root));
    treeBox.replaceChildren(list);
  }

  function reveal(id, scroll) {
    // Open every ancestor so that the node's row exists, then scroll to it.
    let node = nodeById.get(id);
    const chain = [];
    while (node && node.parent !== null && nodeById.has(node.parent)) {
      node = nodeById.get(node.parent);
      chain.push(node.id);
    }
    let rebuild = false;
    for (const ancestor of chain) {
      if (!open.has(ancestor)) {
        open.add(ancestor);
        rebuild = true;
      }
    }
    const target = nodeById.get(id);
    if (hidePruned && target && target.status === "pruned") {
      hidePruned = false;
      byId("tree-hide-pruned").checked = false;
      rebuild = true;
    }
    if (rebuild || !rowOf.has(id)) renderTree();
    const item = rowOf.get(id);
    if (item && scroll) item.querySelector(":scope > .label").scrollIntoView({ block: "nearest" });
  }

  // ------------------------------------------------------------------ node details
  const detail = byId("node-detail");

  function diffView(node) {
    const box = h("pre", { class: "prompt diff", id: "detail-prompt" });
    for (const [op, text] of node.diff) {
      if (op === "=") box.append(text);
      else box.append(h(op === "+" ? "ins" : "del", null, text));
    }
    return box;
  }

  function section(title, ...content) {
    return h("section", { class: "detail-part" }, h("h4", null, title), ...content);
  }

  function nodeLink(id) {
    const target = nodeById.get(id);
    if (!target) return h("span", null, id);
    return h("button", { type: "button", class: "link", onclick: () => select(id) }, id + " (" + fixed(target.reward, 2) + ")");
  }

  function select(id, quiet) {
    const node = nodeById.get(id);
    if (!node) return;
    if (selected && rowOf.has(selected)) rowOf.get(selected).classList.remove("selected");
    selected = id;
    reveal(id, !quiet);
    if (rowOf.has(id)) rowOf.get(id).classList.add("selected");
    if (!quiet && history.replaceState) {
      try {
        history.replaceState(null, "", "#node=" + encodeURIComponent(id));
      } catch (error) {
        /* some file:// contexts refuse; the hash is a convenience */
      }
    }
    const facts = h(
      "dl",
      { class: "facts small" },
      h("div", null, h("dt", null, "level"), h("dd", null, String(node.level))),
      h("div", null, h("dt", null, "status"), h("dd", null, statusTag(node), node.best ? " ★ best path" : "")),
      h("div", null, h("dt", null, "reward"), h("dd", { class: rewardClass(node.reward) }, fixed(node.reward, 3))),
      h("div", null, h("dt", null, "path score"), h("dd", null, fixed(node.score, 3))),
      h("div", null, h("dt", null, "path rewards"), h("dd", null, node.path.map((r) => fixed(r, 2)).join(" → ") || "-")),
      h("div", null, h("dt", null, "created"), h("dd", null, utc(node.t) + " UTC")),
      h("div", null, h("dt", null, "parent"), h("dd", null, node.parent !== null ? nodeLink(node.parent) : "- (root)")),
      h("div", null, h("dt", null, "calls"), h("dd", null, node.calls + " ($" + fixed(node.cost, 5) + ") ", node.calls ? h("button", { type: "button", class: "link", id: "detail-calls", onclick: () => showCallsOf(node.id) }, "show in call table") : null))
    );
    const promptBox = h("div", { class: "prompt-box" });
    const full = h("pre", { class: "prompt full" }, promptOf(node));
    const diff = diffView(node);
    let showingDiff = node.parent !== null && !node.same;
    const switcher = h("button", { type: "button", class: "link" });
    function paint() {
      promptBox.replaceChildren(showingDiff ? diff : full);
      switcher.textContent = showingDiff ? "show the full prompt" : node.parent !== null ? "show the changes from the parent" : "";
    }
    switcher.addEventListener("click", () => {
      showingDiff = !showingDiff;
      paint();
    });
    paint();
    const critique = node.failed
      ? h("p", { class: "error" }, "The judgement could not be parsed: " + (node.error || "no scores"))
      : h(
          "table",
          { class: "critique", id: "detail-critique" },
          h("thead", null, h("tr", null, h("th", null, "aspect"), h("th", null, "score"), h("th", null, "rationale"))),
          h("tbody", null, ...node.aspects.map(([name, score, rationale]) => h("tr", null, h("th", null, name), h("td", { class: "num " + rewardClass(score) }, scoreText(score)), h("td", null, rationale))))
        );
    const kids = childrenOf.get(node.id);
    const parts = [
      h("h3", { id: "detail-title" }, "Node " + node.id),
      facts,
      node.skipped ? h("p", { class: "note" }, "Skipped: its parent scored above the threshold (or its judgement failed), so the parent's prompt carried over unchanged.") : null,
      section("Query", h("pre", { class: "text", id: "detail-query" }, DATA.queries[node.q])),
      section(node.parent !== null && !node.same ? "Prompt (changes from the parent: added, removed)" : "Prompt", node.parent !== null && !node.same ? switcher : null, promptBox),
      section("Answer", h("pre", { class: "text", id: "detail-answer" }, node.answer)),
      section("Critique", critique),
      kids.length ? section("Children", h("div", { class: "children" }, ...kids.map((kid) => nodeLink(kid.id)))) : null,
    ];
    detail.replaceChildren(...parts.filter((part) => part));
  }

  // ------------------------------------------------------------------ the call table
  const calls = DATA.calls;
  const column = Object.fromEntries(calls.columns.map((name, index) => [name, index]));
  const value = (row, name) => {
    const raw = row[column[name]];
    const strings = calls.strings[name];
    return strings ? strings[raw] : raw;
  };
  const shown = [
    ["id", "#", "num"],
    ["role", "role", ""],
    ["model", "model", ""],
    ["node", "node", ""],
    ["status", "status", ""],
    ["prompt_tokens", "tok in", "num"],
    ["completion_tokens", "tok out", "num"],
    ["cached_tokens", "cached", "num"],
    ["latency_s", "latency s", "num"],
    ["attempts", "attempts", "num"],
    ["tries", "tries", "num"],
    ["cost_usd", "cost $", "num"],
    ["replayed", "replayed", "num"],
    ["created_at", "time (UTC)", ""],
    ["error", "error", ""],
  ];
  const table = { sort: "id", descending: false, page: 0, size: 50, rows: calls.rows };
  const roleSelect = byId("calls-role");
  const statusSelect = byId("calls-status");
  const nodeInput = byId("calls-node");
  const textInput = byId("calls-text");
  const sizeSelect = byId("calls-size");
  for (const role of calls.strings.role) roleSelect.append(h("option", { value: role }, role));
  for (const status of calls.strings.status) statusSelect.append(h("option", { value: status }, status));

  function applyFilters() {
    const role = roleSelect.value;
    const status = statusSelect.value;
    const node = nodeInput.value.trim();
    const text = textInput.value.trim().toLowerCase();
    let rows = calls.rows.filter((row) => {
      if (role && value(row, "role") !== role) return false;
      if (status && value(row, "status") !== status) return false;
      if (node) {
        const id = value(row, "node") || "";
        if (!(id === node || (node.endsWith(".") && id.startsWith(node)))) return false;
      }
      if (text) {
        const haystack = (value(row, "model") + " " + (value(row, "error") || "") + " " + value(row, "role")).toLowerCase();
        if (!haystack.includes(text)) return false;
      }
      return true;
    });
    const key = table.sort;
    const sign = table.descending ? -1 : 1;
    rows = rows.slice().sort((a, b) => {
      const x = value(a, key);
      const y = value(b, key);
      if (x === y) return value(a, "id") - value(b, "id");
      if (x === null || x === undefined) return 1;
      if (y === null || y === undefined) return -1;
      return (x < y ? -1 : 1) * sign;
    });
    table.rows = rows;
    table.page = 0;
    renderCalls();
  }

  function renderHead() {
    const row = h("tr");
    for (const [key, title, css] of shown) {
      const arrow = table.sort === key ? (table.descending ? " ▼" : " ▲") : "";
      const cell = h("th", { class: css, "data-key": key, title: "sort by " + title }, title + arrow);
      cell.addEventListener("click", () => {
        table.descending = table.sort === key ? !table.descending : false;
        table.sort = key;
        renderHead();
        applyFilters();
      });
      row.append(cell);
    }
    byId("calls-table").tHead.replaceChildren(row);
  }

  function renderCalls() {
    const total = table.rows.length;
    const pages = Math.max(1, Math.ceil(total / table.size));
    table.page = Math.min(Math.max(0, table.page), pages - 1);
    const first = table.page * table.size;
    const body = document.createDocumentFragment();
    for (const row of table.rows.slice(first, first + table.size)) {
      const status = value(row, "status");
      const tr = h("tr", { class: status === "ok" ? "" : "failed" });
      for (const [key, , css] of shown) {
        let content = value(row, key);
        if (key === "node" && content) {
          const id = content;
          content = nodeById.has(id) ? h("button", { type: "button", class: "link", onclick: () => select(id) }, id) : id;
        } else if (key === "latency_s") content = fixed(content, 2);
        else if (key === "cost_usd") content = fixed(content, 6);
        else if (key === "created_at") content = utc(content);
        else if (content === null || content === undefined) content = "";
        tr.append(h("td", { class: css }, content));
      }
      body.append(tr);
    }
    byId("calls-table").tBodies[0].replaceChildren(body);
    const pager = byId("calls-pager");
    const previous = h("button", { type: "button", id: "calls-prev", disabled: table.page === 0 }, "‹ previous");
    const next = h("button", { type: "button", id: "calls-next", disabled: table.page >= pages - 1 }, "next ›");
    previous.addEventListener("click", () => {
      table.page -= 1;
      renderCalls();
    });
    next.addEventListener("click", () => {
      table.page += 1;
      renderCalls();
    });
    const range = total ? first + 1 + "–" + Math.min(total, first + table.size) : "0";
    pager.replaceChildren(previous, h("span", { id: "calls-range" }, " rows " + range + " of " + total + " (page " + (table.page + 1) + " of " + pages + ") "), next);
  }

  function showCallsOf(id) {
    nodeInput.value = id;
    applyFilters();
    byId("calls-section").scrollIntoView({ block: "start" });
  }

  for (const input of [roleSelect, statusSelect]) input.addEventListener("change", applyFilters);
  for (const input of [nodeInput, textInput]) input.addEventListener("input", applyFilters);
  sizeSelect.addEventListener("change", () => {
    table.size = Number(sizeSelect.value) || 50;
    renderCalls();
  });

  // ------------------------------------------------------------------ toolbar and start
  byId("tree-expand").addEventListener("click", () => {
    for (const node of nodes) if (childrenOf.get(node.id).length) open.add(node.id);
    renderTree();
  });
  byId("tree-collapse").addEventListener("click", () => {
    open.clear();
    renderTree();
  });
  byId("tree-best").addEventListener("click", () => {
    for (const id of bestPath.slice(0, -1)) open.add(id);
    renderTree();
    if (bestPath.length) select(bestPath[bestPath.length - 1]);
  });
  byId("tree-hide-pruned").addEventListener("change", (event) => {
    hidePruned = event.target.checked;
    renderTree();
  });

  renderTree();
  renderHead();
  applyFilters();
  const fromHash = decodeURIComponent((location.hash.match(/^#node=(.+)$/) || [])[1] || "");
  const first = nodeById.has(fromHash) ? fromHash : DATA.tree.best_node_id || (roots[0] && roots[0].id);
  if (first) select(first, true);
  window.__drpoReport = {
    ready: true,
    initMs: performance.now() - started,
    nodes: nodes.length,
    calls: calls.rows.length,
  };
})();
