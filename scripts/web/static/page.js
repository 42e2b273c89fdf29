"use strict";
// The search page: sends the photo (or a catalogue photo's id) and the words to the page server, which asks
// TorchServe with a key the page never sees; draws the answer with textContent only (titles are sellers' text).
const $ = (id) => document.getElementById(id);
const HINTS = {
  413: "Too large for the search service.",
  415: "That file is not a photo the service can read: send a JPEG, PNG, WebP, GIF, BMP or TIFF.",
  400: "The search service could not use that request.",
  404: "Not found.",
  502: "The page server could not use the search service.",
  503: "The search service is not answering or is restarting: try again in a few seconds.",
};
let photo = null;  // the File or Blob to send
let likeId = null;  // "more like this": a catalogue photo's image_id
let maxUpload = Infinity;  // bytes: the page server's limit (GET /api/settings)

function choose(file) {
  if (!file) return;
  if (file.size > maxUpload) {
    return fail(413, `That photo is ${(file.size / 2 ** 20).toFixed(1)} MiB; the search service takes up to ` +
      `${(maxUpload / 2 ** 20).toFixed(0)} MiB: send a smaller one.`);
  }
  photo = file;
  likeId = null;
  showPreview(URL.createObjectURL(file));
  search();
}

function showPreview(src) {
  $("preview").src = src;
  $("preview").hidden = false;
}

function fail(status, message) {
  const hint = HINTS[status] || (status ? `The search failed (${status}).` : "");
  $("message").textContent = [hint, message].filter(Boolean).join(" ");
  $("message").hidden = false;
  $("answer").hidden = true;
}

async function search() {
  const form = new FormData();
  if (likeId) form.append("image_id", likeId);
  else if (photo) form.append("photo", photo);
  for (const name of ["title", "description", "k", "category"]) {
    const value = $(name).value.trim();
    if (value) form.append(name, value);
  }
  if (!likeId && !photo && !$("title").value.trim()) return fail(0, "Choose a photo or type a title.");
  $("go").disabled = true;
  $("message").hidden = true;
  try {
    const response = await fetch("/api/search", { method: "POST", body: form, headers: { "X-Search-Page": "1" } });
    const body = await response.json().catch(() => null);
    if (!response.ok || !body) return fail(response.status, body ? `${body.error} (${body.type})` : response.statusText);
    render(body);
  } catch (error) {
    fail(0, `The page server is not answering (${error.message}).`);
  } finally {
    $("go").disabled = false;
  }
}

const percent = (p) => `${(100 * p).toFixed(1)}%`;
const price = (value) => (value === null ? "no price" : `£${value.toFixed(2)}`);

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function render(answer) {
  $("category-line").textContent = `${answer.category} (${percent(answer.probability)})`;
  const others = answer.top_categories.slice(1).map((top) => `${top.category} ${percent(top.probability)}`);
  $("runners-up").textContent = others.length ? `also: ${others.join(", ")}` : "";
  $("provenance").textContent = `from ${answer.inputs.join(" + ")} · model ${answer.model.name} ` +
    `${answer.model.version} (${answer.model.backend}) · catalogue generation ${answer.catalogue.generation}, ` +
    `${answer.catalogue.photos} photos`;
  const cards = answer.neighbours.map((listing) => {
    const card = element("li");
    card.dataset.imageId = listing.image_id;
    const image = element("img");
    image.alt = listing.title;
    image.src = `/photos/${encodeURIComponent(listing.image_id)}`;
    image.addEventListener("error", () => image.replaceWith(element("div", "missing", "no photo")));
    const text = element("div", "text");
    text.append(element("span", "title", listing.title), element("span", "price", price(listing.price)),
      element("span", "", listing.location), element("span", "hint", listing.category));
    const words = listing.word_similarity === undefined ? "" : ` · words ${listing.word_similarity.toFixed(3)}`;
    text.append(element("span", "hint", `similarity ${listing.similarity.toFixed(3)}${words}`));
    const more = element("button", "more", "More like this");
    more.type = "button";
    more.addEventListener("click", () => {
      likeId = listing.image_id;
      photo = null;
      showPreview(image.src);
      search();
    });
    card.append(image, text, more);
    return card;
  });
  $("grid").replaceChildren(...cards);
  $("answer").hidden = false;
}

$("photo").addEventListener("change", (event) => choose(event.target.files[0]));
$("camera").addEventListener("change", (event) => choose(event.target.files[0]));
$("search").addEventListener("submit", (event) => { event.preventDefault(); search(); });
const drop = $("drop");
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  choose(event.dataTransfer.files[0]);
});
document.addEventListener("paste", (event) => {
  const files = [...event.clipboardData.files];
  if (files.length) choose(files.find((file) => file.type.startsWith("image/")) || files[0]);
});
fetch("/api/settings").then((response) => response.json()).then((settings) => {
  maxUpload = settings.max_upload;
  $("categories").replaceChildren(...settings.categories.map((category) => Object.assign(element("option"), { value: category })));
}).catch(() => {});
