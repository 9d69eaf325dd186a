// Transfer Studio web classifier: runs the bundle's ONNX model in the browser with onnxruntime-web
// (WebAssembly, one thread). Nothing leaves the device: no server code, no network calls beyond
// this folder's own files.
//
// The preprocessing repeats tl_core.preprocess step by step, so the page gives the same answers as
// `transfer-studio predict`: decode (EXIF orientation applied, no colour management, transparency on
// white, JPEG draft scaling), shorter side resized with Pillow's bilinear or bicubic filter (the same fixed-point
// arithmetic, so the pixels match), centre crop, scale to [0, 1], normalise.
'use strict';

(function () {
  const PRECISION_BITS = 22; // Pillow's Resample.c for 8-bit images: 32 - 8 - 2
  const HALF = 2 ** (PRECISION_BITS - 1);
  const ONE = 2 ** PRECISION_BITS;

  const $ = (id) => document.getElementById(id);
  const state = { config: null, session: null, results: [], camera: null, busy: false, unitCentroids: [] };

  // ------------------------------------------------------------------------------------------
  // Preprocessing, as tl_core.preprocess does it

  /** Python's round(): halves go to the even neighbour (centre_crop uses it). */
  function pyRound(x) {
    const r = Math.round(x);
    return Math.abs(x % 1) === 0.5 && r % 2 !== 0 ? r - 1 : r;
  }

  // Pillow's filters (Resample.c): support and kernel.
  const FILTERS = {
    bilinear: {
      support: 1.0,
      kernel: (x) => { x = Math.abs(x); return x < 1.0 ? 1.0 - x : 0.0; },
    },
    bicubic: {
      support: 2.0,
      kernel: (x) => {
        const a = -0.5;
        x = Math.abs(x);
        if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
        if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
        return 0.0;
      },
    },
  };

  /** Pillow's precompute_coeffs + normalize_coeffs_8bpc. */
  function coefficients(inSize, outSize, filter) {
    const scale = inSize / outSize;
    const filterscale = Math.max(scale, 1.0);
    const support = filter.support * filterscale;
    const ksize = Math.ceil(support) * 2 + 1;
    const bounds = new Int32Array(outSize * 2);
    const kk = new Float64Array(outSize * ksize);
    const k = new Float64Array(ksize);
    const ss = 1.0 / filterscale;
    for (let xx = 0; xx < outSize; xx++) {
      const center = (xx + 0.5) * scale;
      let ww = 0.0;
      let xmin = Math.trunc(center - support + 0.5);
      if (xmin < 0) xmin = 0;
      let xmax = Math.trunc(center + support + 0.5);
      if (xmax > inSize) xmax = inSize;
      xmax -= xmin;
      for (let x = 0; x < ksize; x++) k[x] = 0;
      for (let x = 0; x < xmax; x++) {
        const w = filter.kernel((x + xmin - center + 0.5) * ss);
        k[x] = w;
        ww += w;
      }
      for (let x = 0; x < xmax; x++) if (ww !== 0.0) k[x] /= ww;
      for (let x = 0; x < ksize; x++) {
        kk[xx * ksize + x] = k[x] < 0 ? Math.trunc(-0.5 + k[x] * ONE) : Math.trunc(0.5 + k[x] * ONE);
      }
      bounds[xx * 2] = xmin;
      bounds[xx * 2 + 1] = xmax;
    }
    return { bounds, kk, ksize };
  }

  function clip8(v) {
    const x = Math.floor(v / ONE);
    return x < 0 ? 0 : x > 255 ? 255 : x;
  }

  /** Pillow's Image.resize(size, filter) of an RGB image (horizontal pass, then vertical). */
  function resizeRGB(src, w, h, outW, outH, filter) {
    let cur = src;
    let cw = w;
    if (outW !== w) {
      const { bounds, kk, ksize } = coefficients(w, outW, filter);
      const out = new Uint8ClampedArray(outW * h * 3);
      for (let y = 0; y < h; y++) {
        const row = y * w * 3;
        for (let xx = 0; xx < outW; xx++) {
          const xmin = bounds[xx * 2];
          const xmax = bounds[xx * 2 + 1];
          let r = HALF, g = HALF, b = HALF;
          for (let x = 0; x < xmax; x++) {
            const c = kk[xx * ksize + x];
            const p = row + (x + xmin) * 3;
            r += src[p] * c;
            g += src[p + 1] * c;
            b += src[p + 2] * c;
          }
          const o = (y * outW + xx) * 3;
          out[o] = clip8(r);
          out[o + 1] = clip8(g);
          out[o + 2] = clip8(b);
        }
      }
      cur = out;
      cw = outW;
    }
    if (outH !== h) {
      const { bounds, kk, ksize } = coefficients(h, outH, filter);
      const out = new Uint8ClampedArray(cw * outH * 3);
      for (let yy = 0; yy < outH; yy++) {
        const ymin = bounds[yy * 2];
        const ymax = bounds[yy * 2 + 1];
        for (let xx = 0; xx < cw; xx++) {
          let r = HALF, g = HALF, b = HALF;
          for (let y = 0; y < ymax; y++) {
            const c = kk[yy * ksize + y];
            const p = ((y + ymin) * cw + xx) * 3;
            r += cur[p] * c;
            g += cur[p + 1] * c;
            b += cur[p + 2] * c;
          }
          const o = (yy * cw + xx) * 3;
          out[o] = clip8(r);
          out[o + 1] = clip8(g);
          out[o + 2] = clip8(b);
        }
      }
      cur = out;
    }
    return cur;
  }

  /** JPEG draft mode (libjpeg's DCT scaling by 1/2, 1/4 or 1/8), approximated by block averages. */
  function draftScale(w, h, target) {
    const scale = Math.max(1, Math.floor(Math.min(w, h) / target));
    const req = [Math.max(1, Math.floor(w / scale)), Math.max(1, Math.floor(h / scale))];
    const ratio = Math.min(Math.floor(w / req[0]), Math.floor(h / req[1]));
    for (const s of [8, 4, 2, 1]) if (ratio >= s) return s;
    return 1;
  }

  function blockAverage(src, w, h, s) {
    const ow = Math.ceil(w / s);
    const oh = Math.ceil(h / s);
    const out = new Uint8ClampedArray(ow * oh * 3);
    for (let oy = 0; oy < oh; oy++) {
      for (let ox = 0; ox < ow; ox++) {
        let r = 0, g = 0, b = 0, n = 0;
        for (let y = oy * s; y < Math.min(h, oy * s + s); y++) {
          for (let x = ox * s; x < Math.min(w, ox * s + s); x++) {
            const p = (y * w + x) * 3;
            r += src[p]; g += src[p + 1]; b += src[p + 2]; n++;
          }
        }
        const o = (oy * ow + ox) * 3;
        out[o] = Math.round(r / n); out[o + 1] = Math.round(g / n); out[o + 2] = Math.round(b / n);
      }
    }
    return { rgb: out, w: ow, h: oh };
  }

  /** RGBA pixels (canvas order) to RGB, transparency composited on white as Pillow does it. */
  function rgbaToRGB(rgba, n) {
    const rgb = new Uint8ClampedArray(n * 3);
    for (let i = 0; i < n; i++) {
      const a = rgba[i * 4 + 3];
      for (let c = 0; c < 3; c++) {
        const v = rgba[i * 4 + c];
        rgb[i * 3 + c] = a === 255 ? v : Math.round((v * a + 255 * (255 - a)) / 255);
      }
    }
    return rgb;
  }

  /** The network's input (1x3xSxS float32) from RGB pixels, as tl_core.preprocess.preprocess. */
  function toInput(rgb, w, h, pre, isJpeg) {
    if (isJpeg) {
      const s = draftScale(w, h, pre.resize_size);
      if (s > 1) ({ rgb, w, h } = blockAverage(rgb, w, h, s));
    }
    let nw, nh;
    if (w <= h) { nw = pre.resize_size; nh = Math.trunc((pre.resize_size * h) / w); }
    else { nw = Math.trunc((pre.resize_size * w) / h); nh = pre.resize_size; }
    if (nw !== w || nh !== h) { rgb = resizeRGB(rgb, w, h, nw, nh, FILTERS[pre.interpolation] || FILTERS.bilinear); w = nw; h = nh; }
    const size = pre.input_size;
    // Centre crop, padding with zeros when smaller (as center_crop does).
    const padH = Math.max(size - h, 0), padW = Math.max(size - w, 0);
    const ph = h + padH, pw = w + padW;
    const top = pyRound((ph - size) / 2.0) - Math.floor(padH / 2);
    const left = pyRound((pw - size) / 2.0) - Math.floor(padW / 2);
    const plane = size * size;
    const x = new Float32Array(3 * plane);
    for (let c = 0; c < 3; c++) {
      const m = pre.mean[c], sd = pre.std[c];
      for (let i = 0; i < size; i++) {
        const sy = top + i;
        for (let j = 0; j < size; j++) {
          const sx = left + j;
          const v = sy >= 0 && sy < h && sx >= 0 && sx < w ? rgb[(sy * w + sx) * 3 + c] : 0;
          x[c * plane + i * size + j] = (Math.fround(v / 255) - m) / sd;
        }
      }
    }
    return x;
  }

  function pixelsOf(source, width, height) {
    const canvas = document.createElement('canvas');
    canvas.width = width;
    canvas.height = height;
    const ctx = canvas.getContext('2d', { willReadFrequently: true });
    ctx.drawImage(source, 0, 0, width, height);
    return rgbaToRGB(ctx.getImageData(0, 0, width, height).data, width * height);
  }

  // ------------------------------------------------------------------------------------------
  // The model

  // As tl_core.calibration: temperature-scaled probabilities, and "not sure" when the image's backbone
  // features are further (cosine distance) from every class centroid than the calibrated threshold.
  function softmax(logits, temperature) {
    const z = Array.from(logits, (v) => v / temperature);
    const max = Math.max(...z);
    const e = z.map((v) => Math.exp(v - max));
    const sum = e.reduce((a, b) => a + b, 0);
    return e.map((v) => v / sum);
  }

  async function classifyRGB(rgb, w, h, isJpeg) {
    const cfg = state.config;
    const size = cfg.preprocessing.input_size;
    const input = new ort.Tensor('float32', toInput(rgb, w, h, cfg.preprocessing, isJpeg), [1, 3, size, size]);
    const out = await state.session.run({ [cfg.input.name]: input });
    const probs = softmax(out[cfg.output.name].data, cfg.temperature);
    return { probs, unsure: cfg.unsure ? outlierScore(out[cfg.unsure.features].data) > cfg.unsure.threshold : null };
  }

  function unit(v) {
    const norm = Math.sqrt(v.reduce((a, x) => a + x * x, 0)) || 1e-12;
    return Array.from(v, (x) => x / norm);
  }

  function outlierScore(features) {
    const f = unit(features);
    let best = -Infinity;
    for (const centroid of state.unitCentroids) {
      best = Math.max(best, centroid.reduce((a, c, i) => a + c * f[i], 0));
    }
    return 1 - best;
  }

  async function classifyFile(file) {
    const head = new Uint8Array(await file.slice(0, 3).arrayBuffer());
    const isJpeg = head[0] === 0xff && head[1] === 0xd8 && head[2] === 0xff;
    const bitmap = await createImageBitmap(file, {
      imageOrientation: 'from-image', colorSpaceConversion: 'none', premultiplyAlpha: 'none',
    });
    const rgb = pixelsOf(bitmap, bitmap.width, bitmap.height);
    const result = await classifyRGB(rgb, bitmap.width, bitmap.height, isJpeg);
    bitmap.close();
    return result;
  }

  function ranked(probs) {
    return probs.map((p, i) => ({ label: state.config.class_names[i], p })).sort((a, b) => b.p - a.p);
  }

  // ------------------------------------------------------------------------------------------
  // The page

  function bars(probs, k) {
    const list = document.createElement('ol');
    list.className = 'bars';
    for (const { label, p } of ranked(probs).slice(0, k)) {
      const li = document.createElement('li');
      const name = document.createElement('span');
      name.className = 'label';
      name.textContent = label;
      const bar = document.createElement('span');
      bar.className = 'bar';
      const fill = document.createElement('span');
      fill.style.width = `${(p * 100).toFixed(1)}%`;
      bar.appendChild(fill);
      const pct = document.createElement('span');
      pct.className = 'pct';
      pct.textContent = `${(p * 100).toFixed(1)}%`;
      li.append(name, bar, pct);
      list.appendChild(li);
    }
    return list;
  }

  function showResult(name, file, probs, unsure) {
    const card = document.createElement('article');
    card.className = 'result';
    card.dataset.name = name;
    card.dataset.probs = JSON.stringify(probs);
    card.dataset.unsure = JSON.stringify(unsure);
    const img = document.createElement('img');
    img.src = URL.createObjectURL(file);
    img.alt = name;
    const body = document.createElement('div');
    const top = ranked(probs);
    const title = document.createElement('h3');
    title.textContent = top[0].label;
    card.dataset.top1 = top[0].label;
    if (unsure) {
      const flag = document.createElement('span');
      flag.className = 'unsure';
      flag.textContent = 'not sure';
      title.append(' ', flag);
    }
    const caption = document.createElement('p');
    caption.className = 'muted';
    caption.textContent = name;
    body.append(title, caption, bars(probs, state.config.top_k));
    card.append(img, body);
    $('results').prepend(card);
  }

  function showError(name, message) {
    const card = document.createElement('article');
    card.className = 'result error';
    card.dataset.name = name;
    card.dataset.error = message;
    card.textContent = `${name}: ${message}`;
    $('results').prepend(card);
  }

  async function onFiles(files) {
    for (const file of files) {
      try {
        const { probs, unsure } = await classifyFile(file);
        state.results.push({ name: file.name, probabilities: probs, unsure });
        showResult(file.name, file, probs, unsure);
      } catch (err) {
        showError(file.name, 'this file cannot be read as an image; choose a JPEG, PNG, WebP, GIF or BMP photo.');
        console.error(err);
      }
    }
    $('done').textContent = String(state.results.length);
  }

  // The camera: one frame at a time, the next as soon as the last is classified (a few per second
  // on a laptop CPU), never queueing frames behind a slow one.
  async function startCamera() {
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      $('camera-status').textContent = 'This browser gives no camera access here (cameras need https or localhost).';
      return;
    }
    try {
      const stream = await navigator.mediaDevices.getUserMedia({ video: { facingMode: 'environment' }, audio: false });
      const video = $('video');
      video.srcObject = stream;
      video.hidden = false;
      await video.play();
      state.camera = stream;
      $('camera-start').hidden = true;
      $('camera-stop').hidden = false;
      $('camera-status').textContent = '';
      cameraLoop();
    } catch (err) {
      $('camera-status').textContent = `The camera could not start (${err.name}): allow camera access for this page, ` +
        'or use photos instead.';
    }
  }

  function stopCamera() {
    if (state.camera) state.camera.getTracks().forEach((t) => t.stop());
    state.camera = null;
    $('video').hidden = true;
    $('camera-start').hidden = false;
    $('camera-stop').hidden = true;
  }

  async function cameraLoop() {
    const video = $('video');
    let frames = 0;
    let since = performance.now();
    while (state.camera) {
      if (video.videoWidth === 0) {
        await new Promise((r) => setTimeout(r, 50));
        continue;
      }
      const rgb = pixelsOf(video, video.videoWidth, video.videoHeight);
      const { probs, unsure } = await classifyRGB(rgb, video.videoWidth, video.videoHeight, false);
      const top = ranked(probs);
      const live = $('live');
      live.dataset.probs = JSON.stringify(probs);
      live.dataset.top1 = top[0].label;
      live.replaceChildren();
      const title = document.createElement('h3');
      title.textContent = top[0].label;
      if (unsure) {
        const flag = document.createElement('span');
        flag.className = 'unsure';
        flag.textContent = 'not sure';
        title.append(' ', flag);
      }
      live.append(title, bars(probs, state.config.top_k));
      frames++;
      const now = performance.now();
      if (now - since > 1000) {
        $('fps').textContent = `${((frames * 1000) / (now - since)).toFixed(1)} frames per second`;
        frames = 0;
        since = now;
      }
      await new Promise((r) => requestAnimationFrame(r));
    }
  }

  async function main() {
    if (location.protocol === 'file:') {
      $('status').textContent = 'Browsers do not let a page opened from a file load its model. Serve this folder ' +
        'instead: `python -m http.server` inside it, then open http://localhost:8000, or put the folder on any ' +
        'static web host.';
      $('status').className = 'status error';
      return;
    }
    try {
      state.config = await (await fetch('config.json')).json();
      state.unitCentroids = (state.config.unsure ? state.config.unsure.centroids : []).map(unit);
      document.title = `${state.config.title} · image classifier`;
      $('title').textContent = state.config.title;
      $('classes').textContent = state.config.class_names.join(', ');
      ort.env.wasm.numThreads = 1;
      ort.env.wasm.wasmPaths = new URL('./', location.href).href;
      state.session = await ort.InferenceSession.create(state.config.model, { executionProviders: ['wasm'] });
    } catch (err) {
      $('status').textContent = `The model could not be loaded: ${err.message || err}`;
      $('status').className = 'status error';
      return;
    }
    $('status').textContent = 'Ready: everything runs in this browser, nothing is uploaded.';
    $('status').dataset.ready = '1';
    $('files').disabled = false;
    $('camera-start').disabled = false;
    $('files').addEventListener('change', (e) => onFiles(Array.from(e.target.files)));
    const drop = $('drop');
    drop.addEventListener('dragover', (e) => { e.preventDefault(); drop.classList.add('over'); });
    drop.addEventListener('dragleave', () => drop.classList.remove('over'));
    drop.addEventListener('drop', (e) => {
      e.preventDefault();
      drop.classList.remove('over');
      onFiles(Array.from(e.dataTransfer.files));
    });
    $('camera-start').addEventListener('click', startCamera);
    $('camera-stop').addEventListener('click', stopCamera);
  }

  // For scripts and tests: classify a File or Blob and get the probabilities in class order.
  window.transferStudio = { classifyFile, results: state.results, ready: () => state.session !== null };
  main();
})();
