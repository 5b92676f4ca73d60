// distillguard dashboard: keyboard shortcuts and row navigation. No dependencies.
(function () {
  "use strict";
  var base = document.querySelector('link[rel="stylesheet"]').getAttribute("href")
    .replace(/\/static\/dashboard\.css$/, "");
  var pages = { o: "/", c: "/campaigns", a: "/accounts", r: "/review", l: "/ledger" };
  var pendingG = false;
  function typing(el) {
    return el && (el.tagName === "INPUT" || el.tagName === "TEXTAREA" ||
                  el.tagName === "SELECT" || el.isContentEditable);
  }
  function rows() { return Array.prototype.slice.call(document.querySelectorAll("table.nav tbody tr")); }
  function move(delta) {
    var list = rows();
    if (!list.length) { return; }
    var cur = list.findIndex(function (r) { return r.classList.contains("sel"); });
    var next = Math.max(0, Math.min(list.length - 1, cur + delta));
    list.forEach(function (r) { r.classList.remove("sel"); });
    list[next].classList.add("sel");
    var link = list[next].querySelector("a");
    if (link) { link.focus(); }
  }
  document.addEventListener("keydown", function (ev) {
    if (ev.ctrlKey || ev.metaKey || ev.altKey || typing(ev.target)) { return; }
    if (pendingG && pages[ev.key]) {
      pendingG = false; window.location.href = base + pages[ev.key]; ev.preventDefault(); return;
    }
    pendingG = ev.key === "g";
    if (ev.key === "/") {
      var q = document.querySelector("input[type=search], input[name=q]");
      if (q) { q.focus(); ev.preventDefault(); }
    } else if (ev.key === "j") { move(1); } else if (ev.key === "k") { move(-1); }
  });
  // Action forms: confirm before a consequential step.
  document.addEventListener("submit", function (ev) {
    var btn = ev.submitter;
    if (btn && btn.classList.contains("act") && ["suspend", "degrade", "confirm"].indexOf(btn.value) >= 0) {
      if (!window.confirm("Apply '" + btn.value.replace("_", " ") + "'? This is recorded in the audit trail.")) {
        ev.preventDefault();
      }
    }
  });
})();
