// credgate console: small progressive enhancement (every page works without it, except reveal).
// Loaded from the gateway itself; the Content-Security-Policy allows no inline script.
"use strict";

document.addEventListener("submit", (event) => {
  const form = event.target;
  const question = form.getAttribute("data-confirm");
  if (question && !window.confirm(question)) event.preventDefault();
});

// Reveal: fetched on request (POST, no-store), shown for a limited time, then removed from the DOM.
let hideTimer = null;
let tickTimer = null;

function hide() {
  const box = document.getElementById("revealed");
  if (!box) return;
  clearTimeout(hideTimer);
  clearInterval(tickTimer);
  box.replaceChildren();
  box.hidden = true;
}

function show(box, title, data, seconds) {
  hide();
  const heading = document.createElement("h2");
  heading.textContent = title;
  const list = document.createElement("dl");
  list.className = "revealed";
  for (const [key, value] of Object.entries(data)) {
    const dt = document.createElement("dt");
    dt.textContent = key;
    const dd = document.createElement("dd");
    const code = document.createElement("code");
    code.className = "secret";
    code.textContent = value;
    dd.append(code);
    list.append(dt, dd);
  }
  const footer = document.createElement("p");
  footer.className = "muted";
  const count = document.createElement("span");
  count.setAttribute("data-testid", "reveal-countdown");
  let left = seconds;
  count.textContent = `Hidden in ${left} s.`;
  const button = document.createElement("button");
  button.type = "button";
  button.textContent = "Hide now";
  button.addEventListener("click", hide);
  footer.append(count, " ", button);
  box.append(heading, list, footer);
  box.hidden = false;
  tickTimer = setInterval(() => { left -= 1; count.textContent = `Hidden in ${Math.max(left, 0)} s.`; }, 1000);
  hideTimer = setTimeout(hide, seconds * 1000);
}

function error(box, body, status) {
  hide();
  const p = document.createElement("p");
  p.className = "flash error";
  p.setAttribute("role", "alert");
  const err = (body && body.error) || { code: `http_${status}`, message: "The gateway refused the reveal." };
  p.textContent = `${err.message} `;
  const code = document.createElement("code");
  code.textContent = err.code;
  p.append(code);
  box.append(p);
  box.hidden = false;
}

document.addEventListener("click", async (event) => {
  const button = event.target.closest("[data-reveal]");
  if (!button) return;
  const box = document.getElementById("revealed");
  const body = new URLSearchParams({
    csrf: button.dataset.csrf, backend: button.dataset.backend, path: button.dataset.path,
    version: button.dataset.version,
  });
  button.disabled = true;
  try {
    const resp = await fetch("/console/reveal", {
      method: "POST", body, cache: "no-store", credentials: "same-origin",
      headers: { "Content-Type": "application/x-www-form-urlencoded" },
    });
    let answer = null;
    try { answer = await resp.json(); } catch (_) { answer = null; }
    if (resp.ok && answer && answer.data) {
      show(box, `${button.dataset.backend}/${button.dataset.path}, version ${answer.version}`, answer.data, answer.seconds);
    } else {
      error(box, answer, resp.status);
    }
  } finally {
    button.disabled = false;
  }
});

// Leaving the page (or putting it in the back-forward cache) takes a revealed value with it.
window.addEventListener("pagehide", hide);
document.addEventListener("visibilitychange", () => { if (document.visibilityState === "hidden") hide(); });
