"""The one-page HTML form `jaxcls serve` answers at GET /: the fields the task's layout needs (a
text per line; a text and its pair; a context, an optional question and options) and a button
that calls /classify (plain JavaScript, no external files). The answer is shown as the task
gives it: label, labels above their thresholds, values, or the chosen option."""

HEAD = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>jaxcls</title>
<style>
body{font-family:system-ui,sans-serif;max-width:46rem;margin:2rem auto;padding:0 1rem}
textarea{width:100%;height:6rem;font:inherit}input{width:100%;font:inherit}
table{border-collapse:collapse;margin-top:1rem}td,th{padding:.2rem .6rem;border-bottom:1px solid #ddd;text-align:left}
#err{color:#b00}
</style></head><body>
<h1>jaxcls classifier</h1>
<p id="info"></p>
"""

FORMS = {
    "text": """<p>One text per line:</p>
<textarea id="texts">You won a free prize! Call now to claim it.
See you at lunch tomorrow?</textarea>""",
    "pair": """<p>Text:</p><textarea id="text"></textarea>
<p>Second text (text_pair):</p><textarea id="text_pair"></textarea>""",
    "choice": """<p>Context:</p><textarea id="context"></textarea>
<p>Question (optional):</p><input id="question">
<p>Options, one per line:</p><textarea id="choices"></textarea>""",
}
FORMS["similarity"] = FORMS["pair"]

# body(): the request; show(p, k): one answer as table cells
BUILD = {
    "text": """const val = id => document.getElementById(id).value;
const shown = () => val("texts").split("\\n").filter(t => t.trim());
const body = () => ({texts: shown()});""",
    "pair": """const val = id => document.getElementById(id).value;
const shown = () => [val("text") + " | " + val("text_pair")];
const body = () => ({text: val("text"), text_pair: val("text_pair")});""",
    "choice": """const val = id => document.getElementById(id).value;
const options = () => val("choices").split("\\n").filter(t => t.trim());
const shown = () => [val("context")];
const body = () => { const b = {context: val("context"), choices: options()};
                     if (val("question").trim()) b.question = val("question"); return b; };""",
}
BUILD["similarity"] = BUILD["pair"]

TAIL = """
<p><button id="go">Classify</button> <span id="err"></span></p>
<table id="out"></table>
<script>
const esc = s => String(s).replace(/[&<>"]/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;"}[c]));
const f3 = x => Number(x).toFixed(3);
%(build)s
function cells(p) {
  if ("label" in p) return [p.label, f3(p.probability)];
  if ("labels" in p) return [p.labels.join(", ") || "(none)",
                             Object.entries(p.probs).map(([n, x]) => n + " " + f3(x)).join(", ")];
  if ("values" in p) return [Object.entries(p.values).map(([n, x]) => n + " " + f3(x)).join(", "), ""];
  return ["option " + p.index + (typeof options === "function" ? ": " + options()[p.index] : ""),
          p.probs.map(f3).join(", ")];
}
fetch("/info").then(r => r.json()).then(i => {
  document.getElementById("info").textContent = "task: " + i.task + " | labels: " + i.labels.join(", ") +
    " | pooling: " + i.pooling + " | max length: " + i.max_length;
});
document.getElementById("go").onclick = async () => {
  const err = document.getElementById("err"), out = document.getElementById("out");
  err.textContent = ""; out.innerHTML = "";
  const texts = shown();
  if (!texts.length || !texts[0].trim()) { err.textContent = "type a text first"; return; }
  const r = await fetch("/classify", {method: "POST", headers: {"Content-Type": "application/json"},
                                      body: JSON.stringify(body())});
  const j = await r.json();
  if (!r.ok) { err.textContent = j.error; return; }
  out.innerHTML = "<tr><th>input</th><th>answer</th><th>probabilities</th></tr>" +
    j.predictions.map((p, k) => "<tr><td>" + esc(texts[k]) + "</td>" +
                      cells(p).map(c => "<td>" + esc(c) + "</td>").join("") + "</tr>").join("");
};
</script>
</body></html>
"""


def page(layout: str = "text") -> str:
    """The form for a task's input layout (text, pair, similarity or choice)."""
    return HEAD + FORMS[layout] + TAIL % {"build": BUILD[layout]}
