// raftmq console: draws each page into <main> from the JSON API under /api.
// Hand-written, no framework: every value from the cluster goes into the page as
// text (textContent), never as HTML, since message bodies, keys and names are
// anyone's input. Each state change asks window.confirm() first and carries the
// admin credential from the header box.
"use strict";

// ---- DOM and formatting helpers ----

/** Builds an element: attrs are properties (class, id, value, onclick, ...) or
 *  data-* attributes; children are nodes, strings (as text) or arrays of them. */
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") el.className = v;
    else if (k.startsWith("data-") || k === "for" || k === "role") el.setAttribute(k, v);
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el[k] = v;
  }
  const add = (c) => {
    if (c === undefined || c === null || c === false) return;
    if (Array.isArray(c)) c.forEach(add);
    else el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  };
  children.forEach(add);
  return el;
}

const fmt = {
  num(n) {
    return n === undefined || n === null ? "–" : Number(n).toLocaleString("en-US");
  },
  bytes(n) {
    if (n === undefined || n === null) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i === 0 ? n : n.toFixed(1)) + " " + units[i];
  },
  time(ms) {
    if (!ms) return "–";
    const d = new Date(Number(ms));
    return d.toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
  },
  ago(ms) {
    if (ms === undefined || ms === null) return "never";
    if (ms < 1000) return ms + " ms ago";
    return (ms / 1000).toFixed(1) + " s ago";
  },
  rate(r) {
    return r === null ? "–" : r.toFixed(r < 10 ? 1 : 0) + " msg/s";
  },
};

function table(headers, rows, empty) {
  if (!rows.length) return h("div", { class: "empty" }, empty || "Nothing to show.");
  return h("table", {},
    h("thead", {}, h("tr", {}, headers.map((x) =>
      typeof x === "string" ? h("th", {}, x) : h("th", { class: x.cls }, x.label)))),
    h("tbody", {}, rows));
}

function healthBadge(health) {
  const cls = { ok: "ok", unreachable: "bad", "no contact": "warn" }[health] || "";
  return h("span", { class: "badge " + cls }, health);
}

// ---- the API, status line and confirmations ----

class ApiFailure extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

async function api(method, path, body) {
  const opts = { method, headers: {} };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  let r;
  try {
    r = await fetch("/api" + path, opts);
  } catch (e) {
    throw new ApiFailure("the console server did not answer (" + e.message + ")", 0);
  }
  let data = null;
  try {
    data = await r.json();
  } catch (e) {
    data = null;
  }
  if (!r.ok) throw new ApiFailure((data && data.error) || "HTTP " + r.status, r.status);
  return data;
}

const q = encodeURIComponent;

function showStatus(text, kind) {
  const s = document.getElementById("status");
  s.textContent = text;
  s.className = kind || "";
  s.hidden = !text;
}

/** The credential fields every state change carries (empty strings when unset;
 *  the server treats those as absent). */
function credential() {
  return {
    access_key: document.getElementById("cred-access-key").value.trim(),
    secret: document.getElementById("cred-secret").value,
  };
}

/** A state change: asks first, then sends the body with the credential. Returns
 *  null when the person said no. */
async function change(question, method, path, body) {
  if (!window.confirm(question)) {
    showStatus("Cancelled: nothing was changed.", "");
    return null;
  }
  return api(method, path, Object.assign({}, body || {}, credential()));
}

// ---- pages and the router ----

let page = null; // { timers: [], alive: bool }

function every(ms, fn) {
  const p = page;
  const tick = async () => {
    if (!p.alive) return;
    try {
      await fn();
    } catch (e) {
      showStatus(e.message, "error");
    }
    if (p.alive) p.timers.push(setTimeout(tick, ms));
  };
  p.timers.push(setTimeout(tick, ms));
}

const routes = {
  cluster: clusterPage,
  topics: topicsPage,
  groups: groupsPage,
  messages: messagesPage,
  rates: ratesPage,
};

async function route() {
  if (page) {
    page.alive = false;
    page.timers.forEach(clearTimeout);
  }
  page = { timers: [], alive: true };
  const frag = location.hash.replace(/^#\/?/, "");
  const [pathPart, queryPart] = frag.split("?");
  const parts = pathPart.split("/").filter(Boolean).map(decodeURIComponent);
  const name = routes[parts[0]] ? parts[0] : "cluster";
  const params = new URLSearchParams(queryPart || "");
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.dataset.page === name));
  const main = document.getElementById("main");
  main.replaceChildren();
  main.dataset.page = name;
  main.dataset.state = "loading";
  showStatus("", "");
  const mine = page;
  try {
    await routes[name](main, parts.slice(1), params);
    if (mine.alive) main.dataset.state = "ready";
  } catch (e) {
    if (!mine.alive) return;
    main.dataset.state = "error";
    showStatus(e.message, "error");
  }
}

// ---- cluster ----

async function clusterPage(main) {
  main.append(h("h1", {}, "Cluster"));
  const body = h("div");
  main.append(body);
  const draw = async () => {
    const c = await api("GET", "/cluster");
    const parts = [];
    if (c.warning) {
      parts.push(h("div", { class: "panel" },
        h("span", { class: "badge warn" }, "NameServer view"),
        " A group's leader did not answer, so log progress is not shown: " + c.warning));
    }
    if (!c.groups.length) parts.push(h("div", { class: "empty" }, "No broker group is registered with the NameServers."));
    for (const g of c.groups) {
      const rows = g.replicas.map((r) => h("tr", { "data-node": r.node_id },
        h("td", { class: "num" }, r.node_id),
        h("td", { class: "mono" }, r.endpoint),
        h("td", {}, h("span", { class: "badge " + (r.role === "leader" ? "leader" : "") }, r.role)),
        h("td", { class: "num" }, fmt.num(r.last_log_index)),
        h("td", { class: "num" }, fmt.num(r.applied_index)),
        h("td", { class: "num" }, fmt.num(r.matched_index)),
        h("td", { class: "num lag" }, fmt.num(r.lag)),
        h("td", {}, r.role === "leader" && r.lag === 0 ? "–" : fmt.ago(r.last_ack_ms)),
        h("td", {}, healthBadge(r.health))));
      const disk = g.disk_used_ratio === null || g.disk_used_ratio === undefined
        ? "disk not measured yet"
        : "disk " + (g.disk_used_ratio * 100).toFixed(1) + "% used" + (g.disk_full ? " — FULL, sends refused" : "");
      parts.push(h("section", { class: "panel", "data-group": g.broker_group },
        h("h2", {}, g.broker_group),
        h("div", { class: "stats" },
          h("div", {}, h("span", {}, "leader"), g.leader_id === null || g.leader_id === undefined
            ? h("b", { class: "badge bad" }, "none")
            : h("b", {}, "node " + g.leader_id + " ", h("span", { class: "mono muted" }, g.leader_endpoint))),
          h("div", {}, h("span", {}, "term"), h("b", { class: "term" }, g.term)),
          h("div", {}, h("span", {}, "committed index"), h("b", {}, fmt.num(g.committed_index))),
          h("div", {}, h("span", {}, "log"), h("b", {}, fmt.bytes(g.log_bytes) + " in " + g.log_segments + " segment(s)")),
          h("div", {}, h("span", {}, "oldest message"), h("b", {}, fmt.time(g.oldest_message_ms))),
          h("div", {}, h("span", {}, "storage"), h("b", {}, disk))),
        table(["node", "endpoint", "role", { label: "last log", cls: "num" }, { label: "applied", cls: "num" },
          { label: "matched", cls: "num" }, { label: "lag", cls: "num" }, "last ack", "health"], rows),
        h("div", { class: "meta" }, "As reported by node " + g.reported_by + (c.source === "leaders" ? " (the leader)" : " (NameServer)"))));
    }
    body.replaceChildren(...parts);
  };
  await draw();
  every(3000, draw);
}

// ---- topics ----

function topicPlacement(t) {
  return t.groups.map((g) => g.broker_group + " ×" + g.queues).join(", ");
}

async function topicsPage(main, rest) {
  if (rest.length) return topicPage(main, rest[0]);
  main.append(h("h1", {}, "Topics"));
  const name = h("input", { id: "topic-name", placeholder: "TopicName", required: true, spellcheck: false });
  const queues = h("input", { id: "topic-queues", type: "number", min: 1, max: 1024, value: 4 });
  const perm = h("select", { id: "topic-perm" },
    h("option", { value: "read_write" }, "read/write"), h("option", { value: "read" }, "read only"),
    h("option", { value: "write" }, "write only"));
  const type = h("select", { id: "topic-type" },
    ["normal", "fifo", "delay", "transaction", "mixed"].map((t) => h("option", { value: t }, t.toUpperCase())));
  const groups = h("input", { id: "topic-groups", placeholder: "all live groups", spellcheck: false });
  const form = h("form", { id: "topic-create-form" },
    h("label", {}, "Name", name), h("label", {}, "Queues per group", queues), h("label", {}, "Permission", perm),
    h("label", {}, "Message type", type), h("label", {}, "Broker groups (comma-separated)", groups),
    h("button", { id: "topic-create", type: "submit" }, "Create topic"));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const body = {
      name: name.value.trim(),
      queues: Number(queues.value),
      perm: perm.value,
      message_type: type.value,
      groups: groups.value.split(",").map((s) => s.trim()).filter(Boolean),
    };
    const where = body.groups.length ? body.groups.join(", ") : "every live broker group";
    try {
      const r = await change(`Create topic ${body.name} with ${body.queues} queue(s) per group (${body.message_type.toUpperCase()}, ${perm.selectedOptions[0].textContent}) on ${where}?`,
        "POST", "/topics", body);
      if (r) {
        showStatus(`Topic ${body.name} created.`, "ok");
        await draw();
      }
    } catch (e) {
      showStatus("Creating the topic failed: " + e.message, "error");
    }
  });
  const showSystem = h("input", { type: "checkbox", id: "topic-show-system" });
  const list = h("div");
  main.append(h("section", { class: "panel" }, h("h2", {}, "Create a topic"), form),
    h("section", { class: "panel" }, h("h2", {}, "Topics"),
      h("label", { class: "muted" }, showSystem, " show retry and dead-letter topics"), list));
  const draw = async () => {
    const r = await api("GET", "/topics");
    const rows = r.topics.filter((t) => showSystem.checked || !t.system).map((t) => h("tr", { "data-topic": t.name },
      h("td", {}, h("a", { href: "#/topics/" + q(t.name) }, t.name)),
      h("td", {}, [...new Set(t.groups.map((g) => g.message_type))].join(", ")),
      h("td", {}, [...new Set(t.groups.map((g) => g.perm))].join(", ")),
      h("td", {}, topicPlacement(t)),
      h("td", {}, h("div", { class: "row-actions" },
        h("a", { href: "#/messages?topic=" + q(t.name) }, "browse"),
        h("a", { href: "#/rates?topic=" + q(t.name) }, "rates"),
        h("button", { class: "danger", type: "button", onclick: () => deleteTopic(t.name, draw) }, "Delete")))));
    list.replaceChildren(table(["name", "message type", "permission", "queues per broker group", ""], rows,
      "No topics yet: create one above, or send to a cluster that creates topics on first send."));
  };
  showSystem.addEventListener("change", () => draw().catch((e) => showStatus(e.message, "error")));
  await draw();
}

async function deleteTopic(name, after) {
  try {
    const r = await change(`Delete topic ${name} on every broker group? Its messages can no longer be read.`,
      "DELETE", "/topics/" + q(name), {});
    if (r) {
      showStatus(r.existed ? `Topic ${name} deleted.` : `Topic ${name} did not exist.`, "ok");
      await after();
    }
  } catch (e) {
    showStatus("Deleting the topic failed: " + e.message, "error");
  }
}

async function topicPage(main, name) {
  main.append(h("h1", {}, "Topic ", h("span", { class: "mono" }, name)));
  const body = h("div");
  main.append(body);
  let last = null;
  const draw = async () => {
    const t = await api("GET", "/topics/" + q(name));
    const now = Date.now();
    const rate = last ? ((t.max_offset_sum - last.sum) * 1000) / (now - last.at) : null;
    last = { sum: t.max_offset_sum, at: now };
    const sections = t.groups.map((g) => h("section", { class: "panel", "data-group": g.broker_group },
      h("h2", {}, g.broker_group),
      h("div", { class: "meta" }, g.message_type + " · " + g.perm),
      table(["queue", { label: "min offset", cls: "num" }, { label: "max offset", cls: "num" },
        { label: "messages held", cls: "num" }, ""], g.queues.map((qu) => h("tr", { "data-queue": qu.queue_id },
        h("td", { class: "num" }, qu.queue_id),
        h("td", { class: "num min" }, fmt.num(qu.min_offset)),
        h("td", { class: "num max" }, fmt.num(qu.max_offset)),
        h("td", { class: "num" }, qu.error ? h("span", { class: "badge bad", title: qu.error }, "unavailable")
          : fmt.num(qu.max_offset - qu.min_offset)),
        h("td", {}, h("a", {
          href: "#/messages?topic=" + q(name) + "&broker_group=" + q(g.broker_group) + "&queue=" + qu.queue_id +
            "&offset=" + Math.max(qu.min_offset || 0, (qu.max_offset || 0) - 20),
        }, "browse latest")))))));
    body.replaceChildren(
      h("section", { class: "panel" },
        h("div", { class: "stats" },
          h("div", {}, h("span", {}, "messages stored (sum of max offsets)"), h("b", { class: "big", id: "topic-max-sum" }, fmt.num(t.max_offset_sum))),
          h("div", {}, h("span", {}, "messages held"), h("b", { class: "big" }, fmt.num(t.retained))),
          h("div", {}, h("span", {}, "send rate"), h("b", { class: "big" }, fmt.rate(rate)))),
        h("div", { class: "row-actions" },
          h("a", { href: "#/rates?topic=" + q(name) }, "live chart"),
          h("a", { href: "#/messages?topic=" + q(name) }, "browse"),
          h("button", { class: "danger", type: "button", onclick: () => deleteTopic(name, () => { location.hash = "#/topics"; }) },
            "Delete topic"))),
      ...sections);
  };
  await draw();
  every(3000, draw);
}

// ---- consumer groups ----

async function groupsPage(main, rest) {
  if (rest.length) return groupPage(main, rest[0]);
  main.append(h("h1", {}, "Consumer groups"));
  const list = h("div");
  main.append(h("section", { class: "panel" }, list));
  const draw = async () => {
    const r = await api("GET", "/groups");
    list.replaceChildren(table(["group", "topics", { label: "live members", cls: "num" }, { label: "total lag", cls: "num" }, "broker groups"],
      r.groups.map((g) => h("tr", { "data-group": g.name },
        h("td", {}, h("a", { href: "#/groups/" + q(g.name) }, g.name)),
        h("td", {}, g.topics.join(", ")),
        h("td", { class: "num" }, g.live_members),
        h("td", { class: "num lag" }, fmt.num(g.total_lag)),
        h("td", {}, g.broker_groups.join(", ")))),
      "No consumer group has committed an offset or has live members."));
  };
  await draw();
  every(3000, draw);
}

async function groupPage(main, name) {
  main.append(h("h1", {}, "Consumer group ", h("span", { class: "mono" }, name)));
  const summary = h("div");
  const brokers = h("div");
  const topic = h("select", { id: "reset-topic" });
  const to = h("select", { id: "reset-to" },
    h("option", { value: "first" }, "the first message held"),
    h("option", { value: "last" }, "the end (skip everything)"),
    h("option", { value: "time" }, "a time"));
  const when = h("input", { id: "reset-time", type: "datetime-local", step: 1, disabled: true });
  to.addEventListener("change", () => { when.disabled = to.value !== "time"; });
  const form = h("form", { id: "reset-form" },
    h("label", {}, "Topic", topic), h("label", {}, "Move offsets to", to), h("label", {}, "Time (local)", when),
    h("button", { id: "reset-go", type: "submit", class: "danger" }, "Reset offsets"));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    let target = to.value;
    let words = to.selectedOptions[0].textContent;
    if (target === "time") {
      const ms = new Date(when.value).getTime();
      if (!when.value || Number.isNaN(ms)) return showStatus("Pick the time to reset to.", "error");
      target = String(ms);
      words = new Date(ms).toString();
    }
    try {
      const r = await change(`Move consumer group ${name}'s offsets in every queue of ${topic.value} to ${words}? ` +
        "Running members jump on their next heartbeat.", "POST", "/groups/" + q(name) + "/reset-offset",
      { topic: topic.value, to: target });
      if (r) {
        showStatus(`Offsets of ${name} in ${topic.value} reset (${r.queues.length} queue(s)).`, "ok");
        await draw();
      }
    } catch (e) {
      showStatus("Resetting the offsets failed: " + e.message, "error");
    }
  });
  main.append(summary, brokers,
    h("section", { class: "panel" }, h("h2", {}, "Reset offsets"), form),
    h("section", { class: "panel" }, h("a", { href: "#/messages?dlq=" + q(name) }, "Dead-letter queue of " + name)));
  const draw = async () => {
    const d = await api("GET", "/groups/" + q(name));
    const topics = [...new Set(d.broker_groups.flatMap((b) => b.queues.map((x) => x.topic)))].filter((t) => !t.startsWith("%"));
    if (topic.options.length !== topics.length) {
      const keep = topic.value;
      topic.replaceChildren(...topics.map((t) => h("option", { value: t }, t)));
      if (topics.includes(keep)) topic.value = keep;
    }
    const members = d.broker_groups.reduce((n, b) => Math.max(n, b.members.length), 0);
    summary.replaceChildren(h("section", { class: "panel" }, h("div", { class: "stats" },
      h("div", {}, h("span", {}, "total lag"), h("b", { class: "big", id: "group-total-lag" }, d.total_lag)),
      h("div", {}, h("span", {}, "live members"), h("b", { class: "big" }, members)),
      h("div", {}, h("span", {}, "topics"), h("b", { class: "big" }, topics.join(", ") || "–")))));
    brokers.replaceChildren(...d.broker_groups.map((b) => h("section", { class: "panel", "data-broker-group": b.broker_group },
      h("h2", {}, b.broker_group),
      h("h3", {}, "Members"),
      table(["client id", "topic", "tags", "queues", "last heartbeat"], b.members.map((m) => h("tr", {},
        h("td", { class: "mono" }, m.client_id), h("td", {}, m.topic), h("td", { class: "mono" }, m.tag_expression),
        h("td", {}, m.queue_ids.join(", ")), h("td", {}, fmt.ago(m.last_heartbeat_ms_ago)))), "No live member."),
      h("h3", {}, "Queues"),
      table(["topic", { label: "queue", cls: "num" }, { label: "committed", cls: "num" }, { label: "min", cls: "num" },
        { label: "max", cls: "num" }, { label: "lag", cls: "num" }, "held by"],
      b.queues.map((x) => h("tr", { class: "queue-row", "data-key": b.broker_group + "/" + x.topic + "/" + x.queue_id },
        h("td", {}, x.topic), h("td", { class: "num" }, x.queue_id),
        h("td", { class: "num" }, fmt.num(x.committed_offset)), h("td", { class: "num" }, fmt.num(x.min_offset)),
        h("td", { class: "num" }, fmt.num(x.max_offset)),
        h("td", { class: "num lag", "data-lag": x.lag }, fmt.num(x.lag),
          x.skipped ? h("span", { class: "badge warn", title: "removed by retention before consumed" }, " skipped " + x.skipped) : null),
        h("td", { class: "mono" }, x.client_id || "–"))), "No queue."))));
  };
  await draw();
  every(3000, draw);
}

// ---- messages ----

function messageRows(messages, extra) {
  const rows = [];
  for (const m of messages) {
    const place = (m.broker_group ? m.broker_group + "/" : "") + m.queue_id + "@" + m.queue_offset;
    const preview = m.body_preview.length > 60 ? m.body_preview.slice(0, 60) + "…" : m.body_preview;
    const details = h("tr", { class: "details", hidden: true },
      h("td", { colSpan: 7 },
        h("div", { class: "meta" }, "born " + fmt.time(m.born_timestamp_ms) + " · stored " + fmt.time(m.store_timestamp_ms) +
          (m.deliver_at_ms ? " · due " + fmt.time(m.deliver_at_ms) : "") + " · reconsumed " + m.reconsume_times + " time(s) · " +
          fmt.num(m.body_bytes) + " body bytes" + (m.body_truncated ? " (first " + m.body_preview.length + " characters shown)" : "")),
        h("pre", { class: "props" }, Object.entries(m.properties).map(([k, v]) => k + " = " + v).join("\n") || "(no properties)"),
        h("pre", { class: "body" }, m.body_preview)));
    const row = h("tr", { class: "clickable msg-row", "data-id": m.message_id, title: "show details" },
      h("td", { class: "mono" }, m.message_id),
      h("td", {}, m.topic),
      h("td", { class: "mono" }, place),
      h("td", { class: "when" }, fmt.time(m.store_timestamp_ms)),
      h("td", {}, m.tag || "–"),
      h("td", {}, m.keys.join(", ") || "–"),
      h("td", { class: "mono body" }, preview, extra ? extra(m) : null));
    row.addEventListener("click", (ev) => {
      if (ev.target.closest("button")) return;
      details.hidden = !details.hidden;
    });
    rows.push(row, details);
  }
  return table(["id", "topic", "queue@offset", "stored", "tag", "keys", "body"], rows, "No message found.");
}

/** A message's trace timeline: one row per recorded event, oldest first. */
function traceTable(events) {
  const what = (e) => {
    switch (e.kind) {
      case "PRODUCED":
        return `by ${e.producer || "?"}, Raft index ${fmt.num(e.raft_index)}, ${e.topic}/${e.queue_id}` +
          (e.queue_offset === null || e.queue_offset === undefined ? "" : `@${e.queue_offset}`);
      case "RETRIED":
        return `${e.consumer_group} attempt ${e.attempt} failed (${e.detail})` +
          (e.next_delivery_ms ? `, due again ${fmt.time(e.next_delivery_ms)}` : "");
      default:
        return `${e.consumer_group} ${e.client_id ? "(" + e.client_id + ") " : ""}attempt ${e.attempt}` +
          (e.from_topic ? ` from ${e.from_topic}` : "") + (e.detail ? ` (${e.detail})` : "");
    }
  };
  const rows = events.map((e) => h("tr", { "data-trace-kind": e.kind },
    h("td", { class: "when" }, fmt.time(e.time_ms)),
    h("td", {}, h("span", { class: "badge" }, e.kind)),
    h("td", {}, `${e.broker_group} node ${e.node_id}`),
    h("td", {}, what(e))));
  return table(["time", "event", "recorded by", "details"], rows,
    "No trace recorded: tracing was off for this message (a topic's --trace, or the producer's).");
}

async function messagesPage(main, rest, params) {
  main.append(h("h1", {}, "Messages"));
  const results = h("div", { id: "msg-results" });
  const title = h("h2", { id: "msg-results-title" }, "Results");
  const nav = h("div", { class: "row-actions" });
  const show = (heading, messages, extra) => {
    title.textContent = heading;
    results.replaceChildren(messageRows(messages, extra));
  };
  const guard = (fn) => async (ev) => {
    ev.preventDefault();
    try {
      showStatus("", "");
      await fn();
    } catch (e) {
      showStatus(e.message, "error");
    }
  };

  const id = h("input", { id: "msg-id", placeholder: "message id", size: 40, spellcheck: false });
  const byId = h("form", { id: "msg-id-form" }, h("label", {}, "Message id", id), h("button", { id: "msg-id-go", type: "submit" }, "Find"));
  byId.addEventListener("submit", guard(async () => {
    nav.replaceChildren();
    const r = await api("GET", "/messages/by-id?id=" + q(id.value.trim()));
    show("Message " + id.value.trim(), r.messages);
    const t = await api("GET", "/messages/trace?id=" + q(id.value.trim()));
    results.append(h("h3", { id: "trace-title" }, "Trace"), traceTable(t.events));
  }));

  const keyTopic = h("input", { id: "msg-key-topic", placeholder: "topic", spellcheck: false });
  const key = h("input", { id: "msg-key", placeholder: "key", spellcheck: false });
  const byKey = h("form", { id: "msg-key-form" }, h("label", {}, "Topic", keyTopic), h("label", {}, "Key", key),
    h("button", { id: "msg-key-go", type: "submit" }, "Find"));
  byKey.addEventListener("submit", guard(async () => {
    nav.replaceChildren();
    const r = await api("GET", "/messages/by-key?topic=" + q(keyTopic.value.trim()) + "&key=" + q(key.value));
    show(`Messages of ${keyTopic.value.trim()} with key ${key.value}`, r.messages);
  }));

  const bTopic = h("input", { id: "browse-topic", placeholder: "topic", spellcheck: false, value: params.get("topic") || "" });
  const bGroup = h("input", { id: "browse-group", placeholder: "first holding it", spellcheck: false, value: params.get("broker_group") || "" });
  const bQueue = h("input", { id: "browse-queue", type: "number", min: 0, value: params.get("queue") || 0 });
  const bOffset = h("input", { id: "browse-offset", type: "number", min: 0, value: params.get("offset") || 0 });
  const bCount = h("input", { id: "browse-count", type: "number", min: 1, max: 100, value: 20 });
  const browse = async () => {
    const path = "/messages/browse?topic=" + q(bTopic.value.trim()) + (bGroup.value.trim() ? "&broker_group=" + q(bGroup.value.trim()) : "") +
      "&queue=" + q(bQueue.value) + "&offset=" + q(bOffset.value) + "&count=" + q(bCount.value);
    const r = await api("GET", path);
    bGroup.value = r.broker_group;
    show(`${r.topic} on ${r.broker_group}, queue ${r.queue_id}: offsets ${bOffset.value}.. (queue holds ${r.min_offset}..${r.max_offset})`, r.messages);
    const count = Number(bCount.value);
    const prev = Math.max(r.min_offset, Number(bOffset.value) - count);
    nav.replaceChildren(
      h("button", { class: "secondary", type: "button", disabled: Number(bOffset.value) <= r.min_offset,
        onclick: guard(async () => { bOffset.value = prev; await browse(); }) }, "← previous " + count),
      h("button", { class: "secondary", type: "button", disabled: r.next_offset >= r.max_offset,
        onclick: guard(async () => { bOffset.value = r.next_offset; await browse(); }) }, "next " + count + " →"));
  };
  const browseForm = h("form", { id: "browse-form" }, h("label", {}, "Topic", bTopic), h("label", {}, "Broker group", bGroup),
    h("label", {}, "Queue", bQueue), h("label", {}, "From offset", bOffset), h("label", {}, "Count (≤ 100)", bCount),
    h("button", { id: "browse-go", type: "submit" }, "Browse"));
  browseForm.addEventListener("submit", guard(browse));

  const dlqGroup = h("input", { id: "dlq-group", placeholder: "consumer group", spellcheck: false, value: params.get("dlq") || "" });
  const listDlq = async () => {
    nav.replaceChildren();
    const g = dlqGroup.value.trim();
    const r = await api("GET", "/groups/" + q(g) + "/dlq?max=200");
    show(`Dead-letter queue of ${g} (${r.messages.length} shown, oldest first)`, r.messages, (m) =>
      h("div", {}, h("button", { class: "secondary resend", type: "button", onclick: guard(async () => {
        const sent = await change(`Send dead letter ${m.message_id} back to topic ${m.topic} as a new message? It also stays in the DLQ.`,
          "POST", "/groups/" + q(g) + "/dlq/resend", { id: m.message_id });
        if (sent) showStatus(`Resent ${m.message_id} as ${sent.message_id} (${sent.broker_group}/${sent.queue_id}@${sent.queue_offset}).`, "ok");
      }) }, "Resend")));
  };
  const dlqForm = h("form", { id: "dlq-form" }, h("label", {}, "Consumer group", dlqGroup), h("button", { id: "dlq-go", type: "submit" }, "List dead letters"));
  dlqForm.addEventListener("submit", guard(listDlq));

  main.append(
    h("div", { class: "grid" },
      h("section", { class: "panel" }, h("h2", {}, "By id"), byId),
      h("section", { class: "panel" }, h("h2", {}, "By key"), byKey)),
    h("section", { class: "panel" }, h("h2", {}, "Browse a queue"), browseForm),
    h("section", { class: "panel" }, h("h2", {}, "Dead-letter queue"), dlqForm),
    h("section", { class: "panel" }, title, results, nav));
  if (params.get("topic")) await browse();
  else if (params.get("dlq")) await listDlq();
}

// ---- live rates ----

/** Send rate: the change of a topic's summed max offsets; consume rate: the change
 *  of a group's summed committed offsets in that topic; both per second between
 *  successive samples taken by this page. */
async function ratesPage(main, rest, params) {
  main.append(h("h1", {}, "Live send and consume rates"));
  const topic = h("select", { id: "rates-topic" });
  const group = h("select", { id: "rates-group" }, h("option", { value: "" }, "(none)"));
  const [topics, groups] = await Promise.all([api("GET", "/topics"), api("GET", "/groups")]);
  for (const t of topics.topics.filter((t) => !t.system)) topic.append(h("option", { value: t.name }, t.name));
  const fillGroups = () => {
    const keep = group.value;
    group.replaceChildren(h("option", { value: "" }, "(none)"),
      ...groups.groups.filter((g) => g.topics.includes(topic.value)).map((g) => h("option", { value: g.name }, g.name)));
    if ([...group.options].some((o) => o.value === keep)) group.value = keep;
    else if (group.options.length > 1) group.selectedIndex = 1;
  };
  if (params.get("topic")) topic.value = params.get("topic");
  fillGroups();
  if (params.get("group")) group.value = params.get("group");
  const readout = h("div", { class: "stats" },
    h("div", {}, h("span", {}, "send"), h("b", { class: "big", id: "rate-send" }, "–")),
    h("div", {}, h("span", {}, "consume"), h("b", { class: "big", id: "rate-consume" }, "–")),
    h("div", {}, h("span", {}, "lag"), h("b", { class: "big", id: "rate-lag" }, "–")));
  const canvas = h("canvas", { class: "chart", id: "rates-chart" });
  main.append(h("section", { class: "panel" },
    h("form", {}, h("label", {}, "Topic", topic), h("label", {}, "Consumer group", group)),
    h("p", { class: "muted" }, "Sampled every 2 s from the queues' max offsets and the group's committed offsets; the last minute is drawn."),
    readout,
    h("div", { class: "legend" }, h("span", {}, h("i", { class: "send" }), "send"),
      h("span", {}, h("i", { class: "consume" }), "consume")),
    h("div", { class: "chart-wrap" }, canvas)));
  if (!topic.value) {
    main.append(h("div", { class: "empty" }, "No topic to chart yet."));
  }
  let samples = [];
  let prev = null;
  const reset = () => { samples = []; prev = null; drawChart(canvas, samples); };
  topic.addEventListener("change", () => { fillGroups(); reset(); });
  group.addEventListener("change", reset);
  const sample = async () => {
    if (!topic.value) return;
    const t = topic.value;
    const g = group.value;
    const [d, cg] = await Promise.all([api("GET", "/topics/" + q(t)), g ? api("GET", "/groups/" + q(g)) : null]);
    if (t !== topic.value || g !== group.value) return; // changed meanwhile
    let committed = null;
    let lag = null;
    if (cg) {
      const queues = cg.broker_groups.flatMap((b) => b.queues).filter((x) => x.topic === t);
      committed = queues.reduce((n, x) => n + (x.committed_offset || 0), 0);
      lag = queues.reduce((n, x) => n + x.lag, 0);
    }
    const now = Date.now();
    if (prev) {
      const secs = (now - prev.at) / 1000;
      samples.push({
        at: now,
        send: Math.max(0, (d.max_offset_sum - prev.sent) / secs),
        consume: committed === null || prev.committed === null ? null : Math.max(0, (committed - prev.committed) / secs),
      });
      if (samples.length > SPAN) samples.shift();
      const s = samples[samples.length - 1];
      document.getElementById("rate-send").textContent = fmt.rate(s.send);
      document.getElementById("rate-consume").textContent = fmt.rate(s.consume);
    }
    document.getElementById("rate-lag").textContent = lag === null ? "–" : fmt.num(lag);
    prev = { at: now, sent: d.max_offset_sum, committed };
    drawChart(canvas, samples);
  };
  await sample();
  every(2000, sample);
}

/** Samples the rates chart keeps: one a minute at one per 2 s. */
const SPAN = 30;

/** A two-line chart on a canvas: y from 0 to a rounded maximum, x over the samples. */
function drawChart(canvas, samples) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 800;
  const hgt = canvas.clientHeight || 320;
  canvas.width = Math.round(w * dpr);
  canvas.height = Math.round(hgt * dpr);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, w, hgt);
  const css = getComputedStyle(document.documentElement);
  const pad = { l: 64, r: 16, t: 12, b: 28 };
  const plotW = w - pad.l - pad.r;
  const plotH = hgt - pad.t - pad.b;
  let max = 1;
  for (const s of samples) max = Math.max(max, s.send, s.consume || 0);
  const step = niceStep(max / 4);
  max = Math.ceil(max / step) * step;
  ctx.font = "12px system-ui, sans-serif";
  ctx.fillStyle = "#5e6878";
  ctx.strokeStyle = "#dde1e7";
  ctx.lineWidth = 1;
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  for (let v = 0; v <= max + step / 2; v += step) {
    const y = pad.t + plotH - (v / max) * plotH;
    ctx.beginPath();
    ctx.moveTo(pad.l, y);
    ctx.lineTo(w - pad.r, y);
    ctx.stroke();
    ctx.fillText(v.toLocaleString("en-US") + "/s", pad.l - 8, y);
  }
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  const span = SPAN;
  ctx.fillText("-1 min", pad.l, hgt - pad.b + 8);
  ctx.fillText("now", w - pad.r, hgt - pad.b + 8);
  const x = (i) => pad.l + plotW - ((samples.length - 1 - i) / (span - 1)) * plotW;
  const y = (v) => pad.t + plotH - (v / max) * plotH;
  const line = (key, color) => {
    ctx.strokeStyle = color;
    ctx.lineWidth = 2;
    ctx.beginPath();
    let started = false;
    samples.forEach((s, i) => {
      if (s[key] === null) { started = false; return; }
      if (started) ctx.lineTo(x(i), y(s[key]));
      else { ctx.moveTo(x(i), y(s[key])); started = true; }
    });
    ctx.stroke();
  };
  line("send", css.getPropertyValue("--send").trim() || "#2563a8");
  line("consume", css.getPropertyValue("--consume").trim() || "#c2410c");
  if (samples.length < 2) {
    ctx.fillStyle = "#5e6878";
    ctx.textAlign = "center";
    ctx.textBaseline = "middle";
    ctx.fillText("collecting samples…", pad.l + plotW / 2, pad.t + plotH / 2);
  }
}

function niceStep(raw) {
  const p = Math.pow(10, Math.floor(Math.log10(Math.max(raw, 1e-9))));
  for (const m of [1, 2, 5, 10]) if (raw <= m * p) return Math.max(m * p, 0.5);
  return 10 * p;
}

// ---- start ----

window.addEventListener("hashchange", route);
window.addEventListener("DOMContentLoaded", () => {
  // The credential stays in this tab (sessionStorage), never in the URL.
  for (const id of ["cred-access-key", "cred-secret"]) {
    const el = document.getElementById(id);
    el.value = sessionStorage.getItem(id) || "";
    el.addEventListener("input", () => sessionStorage.setItem(id, el.value));
  }
  route();
});
