"""The one-page HTML form `jaxcls serve` answers at GET /: a text box and a button that calls
/classify (plain JavaScript, no external files)."""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>jaxcls</title>
<style>
body{font-family:system-ui,sans-serif;max-width:46rem;margin:2rem auto;padding:0 1rem}
textarea{width:100%;height:8rem;font:inherit}
table{border-collapse:collapse;margin-top:1rem}td,th{padding:.2rem .6rem;border-bottom:1px solid #ddd;text-align:left}
#err{color:#b00}
</style></head><body>
<h1>jaxcls classifier</h1>
<p id="info"></p>
<p>One text per line:</p>
<textarea id="texts">You won a free prize! Call now to claim it.
See you at lunch tomorrow?</textarea>
<p><button id="go">Classify</button> <span id="err"></span></p>
<table id="out"></table>
<script>
const esc = s => s.replace(/[&<>"]/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;",'"':"&quot;"}[c]));
fetch("/info").then(r => r.json()).then(i => {
  document.getElementById("info").textContent =
    "labels: " + i.labels.join(", ") + " | pooling: " + i.pooling + " | max length: " + i.max_length;
});
document.getElementById("go").onclick = async () => {
  const texts = document.getElementById("texts").value.split("\\n").filter(t => t.trim());
  const err = document.getElementById("err"), out = document.getElementById("out");
  err.textContent = ""; out.innerHTML = "";
  if (!texts.length) { err.textContent = "type a text first"; return; }
  const r = await fetch("/classify", {method: "POST", headers: {"Content-Type": "application/json"},
                                      body: JSON.stringify({texts})});
  const j = await r.json();
  if (!r.ok) { err.textContent = j.error; return; }
  out.innerHTML = "<tr><th>text</th><th>label</th><th>probability</th></tr>" +
    j.predictions.map((p, k) => "<tr><td>" + esc(texts[k]) + "</td><td>" + esc(p.label) +
                      "</td><td>" + p.probability.toFixed(3) + "</td></tr>").join("");
};
</script>
</body></html>
"""
