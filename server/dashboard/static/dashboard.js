/* Shared helpers for the fedlora dashboard pages: plain browser JavaScript, no build step, no network but this server. */
"use strict";
(function () {
  // The server has set the token cookie for a page opened with ?token=; keep the token out of the address bar.
  const here = new URL(window.location.href);
  if (here.searchParams.has("token")) {
    here.searchParams.delete("token");
    window.history.replaceState(null, "", here);
  }

  async function fetchJSON(path) {
    const response = await fetch(path, { headers: { Accept: "application/json" }, cache: "no-store" });
    let body = null;
    try {
      body = await response.json();
    } catch (ignored) {
      body = null;
    }
    if (!response.ok) {
      const error = new Error(body && body.error ? body.error : `${response.status} ${response.statusText}`);
      error.status = response.status;
      throw error;
    }
    return body;
  }

  const isNumber = (x) => typeof x === "number" && Number.isFinite(x);
  const formatPercent = (x) => (isNumber(x) ? (100 * x).toFixed(2) + "%" : "–");
  const formatFixed = (x, digits) => (isNumber(x) ? x.toFixed(digits) : "–");
  const formatTime = (iso) => (iso ? new Date(iso).toLocaleString() : "–");
  const SHORT_TIME = { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" };
  const formatShortTime = (iso) => (iso ? new Date(iso).toLocaleString([], SHORT_TIME) : "–");

  // Decimal units (kB = 1000 B), as the coordinator's log prints them; chart ticks then land on round numbers.
  function formatBytes(n) {
    if (!isNumber(n)) return "–";
    const units = ["B", "kB", "MB", "GB", "TB"];
    let value = n;
    let unit = 0;
    while (Math.abs(value) >= 1000 && unit < units.length - 1) {
      value /= 1000;
      unit += 1;
    }
    return (unit === 0 ? String(value) : value.toFixed(1)) + " " + units[unit];
  }

  function formatDuration(seconds) {
    if (!isNumber(seconds)) return "–";
    const s = Math.floor(seconds);
    const h = Math.floor(s / 3600);
    const m = Math.floor((s % 3600) / 60);
    const pad = (k) => String(k).padStart(2, "0");
    if (h > 0) return `${h}h ${pad(m)}m ${pad(s % 60)}s`;
    if (m > 0) return `${m}m ${pad(s % 60)}s`;
    return `${s}s`;
  }

  function showError(message) {
    const box = document.getElementById("error");
    box.textContent = message || "";
    box.hidden = !message;
  }

  function setLive(text, on) {
    const badge = document.getElementById("live");
    badge.textContent = text;
    badge.classList.toggle("on", Boolean(on));
  }

  function cell(row, text, className, value) {
    const td = document.createElement("td");
    td.textContent = text;
    if (className) td.className = className;
    if (value !== undefined && value !== null) td.dataset.value = String(value);
    row.appendChild(td);
    return td;
  }

  function statusBadge(element, status) {
    element.textContent = status;
    element.className = "status " + status;
  }

  // Run tick() now and again after the delay (ms) it returns; errors are shown, and polling goes on.
  function poll(tick) {
    async function loop() {
      let delay = 5000;
      try {
        delay = await tick();
        showError(null);
      } catch (error) {
        showError(error.message);
        setLive("store unavailable", false);
      }
      window.setTimeout(loop, delay);
    }
    loop();
  }

  window.fedlora = {
    fetchJSON, isNumber, formatPercent, formatFixed, formatTime, formatShortTime, formatBytes, formatDuration,
    showError, setLive, cell, statusBadge, poll,
  };
})();
