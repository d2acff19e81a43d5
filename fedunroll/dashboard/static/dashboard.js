// fedunroll dashboard: keeps each run panel of the page current. The server draws everything
// (HTML tables, inline SVG charts); this only swaps a panel's content when its run changes,
// told by server-sent events (/api/runs/RUN/stream), with plain polling where those fail.
"use strict";
(function () {
  function refresh(panel) {
    var run = panel.getAttribute("data-run");
    var prefix = panel.getAttribute("data-prefix") || "";
    var url = "/runs/" + encodeURIComponent(run) + "/panel?prefix=" + encodeURIComponent(prefix);
    return fetch(url, { credentials: "same-origin", cache: "no-store" }).then(function (r) {
      if (!r.ok) { return null; }
      var version = r.headers.get("X-Run-Version") || "";
      var live = r.headers.get("X-Run-Live") || "0";
      return r.text().then(function (html) {
        var open = {};
        panel.querySelectorAll("details").forEach(function (d, i) { open[i] = d.open; });
        panel.innerHTML = html;
        panel.querySelectorAll("details").forEach(function (d, i) { if (open[i]) { d.open = true; } });
        panel.setAttribute("data-version", version);
        panel.setAttribute("data-live", live);
        panel.setAttribute("data-updated", String(Date.now()));
        return live;
      });
    });
  }

  function poll(panel) {
    var timer = setInterval(function () {
      refresh(panel).then(function (live) { if (live === "0") { clearInterval(timer); } });
    }, 2000);
  }

  function watch(panel) {
    var run = panel.getAttribute("data-run");
    if (!window.EventSource) { poll(panel); return; }
    var errors = 0;
    var source = new EventSource("/api/runs/" + encodeURIComponent(run) + "/stream");
    source.onmessage = function (ev) {
      errors = 0;
      var version = "";
      try { version = JSON.parse(ev.data).version; } catch (e) { return; }
      if (version === panel.getAttribute("data-version")) { return; }
      refresh(panel).then(function (live) { if (live === "0") { source.close(); } });
    };
    source.onerror = function () {
      errors += 1;  // the server ends each stream after a while; the browser reconnects
      if (errors > 5) { source.close(); poll(panel); }
    };
  }

  document.querySelectorAll("section.panel").forEach(function (panel) {
    if (panel.getAttribute("data-live") === "1") { watch(panel); }
  });
})();
