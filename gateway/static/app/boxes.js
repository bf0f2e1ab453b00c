/* The detections of the results map as one MapLibre custom layer, all boxes in one draw call a frame.
 *
 * - Every box is a quad (four vertices, two triangles) in WebGL2 buffers built once. Each vertex carries
 *   its whole box; which corner it is comes from its index modulo 4. Quads rather than instances of one
 *   quad: SwiftShader, the CPU renderer of headless and GPU-less browsers, pays per instance (2.4 s a
 *   frame for 100,000 instances against about 0.3 s for the quads, docs/performance.md).
 * - The boxes are in increasing score order, so the score slider hides a prefix of the buffers (the
 *   draw starts further in): nothing is tiled or laid out again.
 * - A box's fill and its outline come from the same quad: the fragment shader draws the outline where
 *   the box's own coordinates are within LINE_PX of an edge. A box smaller than MIN_PX on screen is
 *   grown to MIN_PX around its centre, so zoomed out each detection stays a coloured dot.
 * - Hovering finds boxes through a uniform grid over them (`at`).
 *
 * Coordinates are Web Mercator (0..1) relative to the first box's corner, in float32 (a fraction of a
 * millimetre at the size of a job); the layer adds that origin to MapLibre's matrix in float64.
 */
"use strict";

window.PalmBoxes = (() => {
  const MIN_PX = 2.5;
  const LINE_PX = 1.5;
  const FILL_ALPHA = 0.18;

  const VERTEX = `#version 300 es
uniform mat4 u_matrix;
uniform vec2 u_viewport;
uniform float u_min_px;
in vec4 a_box;
in vec4 a_colour;
out vec2 v_uv;
flat out vec4 v_colour;

vec2 screen(vec2 p) {
  vec4 clip = u_matrix * vec4(p, 0.0, 1.0);
  return clip.xy / clip.w * u_viewport * 0.5;
}

void main() {
  vec2 corner = vec2(float(gl_VertexID & 1), float((gl_VertexID >> 1) & 1));
  vec2 origin = screen(a_box.xy);
  vec2 sides = vec2(length(screen(a_box.zy) - origin), length(screen(a_box.xw) - origin));
  vec2 grow = max(vec2(1.0), u_min_px / max(sides, vec2(1e-6)));
  vec2 local = 0.5 + (corner - 0.5) * grow;
  gl_Position = u_matrix * vec4(mix(a_box.xy, a_box.zw, local), 0.0, 1.0);
  v_uv = corner;
  v_colour = a_colour;
}`;

  const FRAGMENT = `#version 300 es
precision mediump float;
uniform float u_fill;
uniform float u_line;
in vec2 v_uv;
flat in vec4 v_colour;
out vec4 colour;

void main() {
  vec2 pixel = fwidth(v_uv) * u_line;
  vec2 edge = step(v_uv, pixel) + step(1.0 - pixel, v_uv);
  float alpha = max(edge.x, edge.y) > 0.0 ? 1.0 : u_fill;
  colour = vec4(v_colour.rgb * alpha, alpha);
}`;

  const mercatorX = (lon) => (lon + 180) / 360;
  const mercatorY = (lat) => (180 - (180 / Math.PI) * Math.log(Math.tan(Math.PI / 4 + (lat * Math.PI) / 360))) / 360;

  function rgba(hex) {
    return [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16)).concat(255);
  }

  /** The boxes of `features` (GeoJSON polygons, already in increasing score order) as a custom layer
   * `id` (for map.addLayer), each coloured `colourOf(feature)` ("#rrggbb"); the layer also answers
   * hide, at and drawnIn (map.getLayer(id).implementation in the browser's console). */
  function create(id, features, colourOf) {
    const n = features.length;
    const boxes = new Float32Array(4 * n);
    let origin = [0, 0];
    for (let i = 0; i < n; i += 1) {
      const ring = features[i].geometry.coordinates[0];
      let [west, south, east, north] = [Infinity, Infinity, -Infinity, -Infinity];
      for (const [lon, lat] of ring) {
        west = Math.min(west, lon); east = Math.max(east, lon);
        south = Math.min(south, lat); north = Math.max(north, lat);
      }
      const [x0, y0] = [mercatorX(west), mercatorY(north)];
      if (i === 0) origin = [x0, y0];
      boxes.set([x0 - origin[0], y0 - origin[1], mercatorX(east) - origin[0], mercatorY(south) - origin[1]], 4 * i);
    }
    const grid = gridOf(boxes);
    let hidden = 0;
    let gl = null;
    let program = null;
    let vao = null;
    let vaoReady = false;
    let buffers = [];
    let where = {};

    const layer = {
      id,
      type: "custom",
      renderingMode: "2d",
      onAdd(_map, context) {
        gl = context;
        program = link(gl, VERTEX, FRAGMENT);
        where = Object.fromEntries(
          ["u_matrix", "u_viewport", "u_min_px", "u_fill", "u_line"].map((name) => [name, gl.getUniformLocation(program, name)]),
        );
        vao = gl.createVertexArray();
        vaoReady = false;
        const [corners, colours, triangles] = vertices(boxes, features, colourOf);
        buffers = [[gl.ARRAY_BUFFER, corners], [gl.ARRAY_BUFFER, colours], [gl.ELEMENT_ARRAY_BUFFER, triangles]].map(
          ([target, data]) => {
            const buffer = gl.createBuffer();
            gl.bindBuffer(target, buffer);
            gl.bufferData(target, data, gl.STATIC_DRAW);
            gl.bindBuffer(target, null);
            return buffer;
          },
        );
      },
      onRemove() {
        if (!gl) return;
        for (const buffer of buffers) gl.deleteBuffer(buffer);
        gl.deleteVertexArray(vao);
        gl.deleteProgram(program);
        gl = null;
      },
      render(context, options) {
        const count = n - hidden;
        if (!count) return;
        const m = options.defaultProjectionData.mainMatrix;
        const matrix = Float32Array.from(m);
        for (let row = 0; row < 4; row += 1) matrix[12 + row] = m[row] * origin[0] + m[4 + row] * origin[1] + m[12 + row];
        context.useProgram(program);
        context.uniformMatrix4fv(where.u_matrix, false, matrix);
        context.uniform2f(where.u_viewport, context.drawingBufferWidth, context.drawingBufferHeight);
        const ratio = window.devicePixelRatio || 1;
        context.uniform1f(where.u_min_px, MIN_PX * ratio);
        context.uniform1f(where.u_line, LINE_PX * ratio);
        context.uniform1f(where.u_fill, FILL_ALPHA);
        context.bindVertexArray(vao);
        if (!vaoReady) {
          const attributes = [["a_box", 4, context.FLOAT, false], ["a_colour", 4, context.UNSIGNED_BYTE, true]];
          attributes.forEach(([name, size, type, normalised], k) => {
            const location = context.getAttribLocation(program, name);
            context.bindBuffer(context.ARRAY_BUFFER, buffers[k]);
            context.enableVertexAttribArray(location);
            context.vertexAttribPointer(location, size, type, normalised, 0, 0);
          });
          context.bindBuffer(context.ELEMENT_ARRAY_BUFFER, buffers[2]);
          vaoReady = true;
        }
        context.drawElements(context.TRIANGLES, 6 * count, context.UNSIGNED_INT, 6 * 4 * hidden);
        context.bindVertexArray(null);
        context.bindBuffer(context.ARRAY_BUFFER, null);
      },
    };

    /** Box `i` overlaps the rectangle [x0, x1] x [y0, y1] (relative Mercator). */
    const overlaps = (i, x0, y0, x1, y1) =>
      boxes[4 * i] <= x1 && boxes[4 * i + 2] >= x0 && boxes[4 * i + 1] <= y1 && boxes[4 * i + 3] >= y0;

    return Object.assign(layer, {
      /** Draws only the boxes from rank `count` on (the `count` lowest scores are hidden). */
      hide(count) { hidden = Math.max(0, Math.min(n, count)); },
      /** The index of the highest-scoring shown box under `lngLat`, within a few pixels at `zoom`;
       * -1 when there is none. */
      at(lngLat, zoom) {
        const x = mercatorX(lngLat.lng) - origin[0];
        const y = mercatorY(lngLat.lat) - origin[1];
        const reach = (MIN_PX / 2 + 1) / (512 * 2 ** zoom);
        let best = -1;
        grid.visit(x - reach, y - reach, x + reach, y + reach, (i) => {
          if (i >= hidden && i > best && overlaps(i, x - reach, y - reach, x + reach, y + reach)) best = i;
        });
        return best;
      },
      /** How many shown boxes overlap `bounds` (a LngLatBounds: the map's view). */
      drawnIn(bounds) {
        const [x0, x1] = [mercatorX(bounds.getWest()) - origin[0], mercatorX(bounds.getEast()) - origin[0]];
        const [y0, y1] = [mercatorY(bounds.getNorth()) - origin[1], mercatorY(bounds.getSouth()) - origin[1]];
        let count = 0;
        for (let i = hidden; i < n; i += 1) if (overlaps(i, x0, y0, x1, y1)) count += 1;
        return count;
      },
    });
  }

  /** The vertex data of `boxes`: four vertices a box, each with the whole box (x0, y0, x1, y1) and its
   * colour (RGBA bytes), and two triangles a box (indices 4i..4i + 3, the corners in the order the vertex
   * shader reads them). */
  function vertices(boxes, features, colourOf) {
    const n = boxes.length / 4;
    const corners = new Float32Array(16 * n);
    const colours = new Uint8Array(16 * n);
    const triangles = new Uint32Array(6 * n);
    for (let i = 0; i < n; i += 1) {
      const box = boxes.subarray(4 * i, 4 * i + 4);
      const colour = rgba(colourOf(features[i]));
      for (let k = 0; k < 4; k += 1) {
        corners.set(box, 16 * i + 4 * k);
        colours.set(colour, 16 * i + 4 * k);
      }
      triangles.set([4 * i, 4 * i + 1, 4 * i + 2, 4 * i + 2, 4 * i + 1, 4 * i + 3], 6 * i);
    }
    return [corners, colours, triangles];
  }

  /** A uniform grid of about four boxes per cell over the boxes' extent: each cell lists the boxes that
   * overlap it (compressed rows: `starts[c]..starts[c + 1]` in `items`). */
  function gridOf(boxes) {
    const n = boxes.length / 4;
    let [x0, y0, x1, y1] = [Infinity, Infinity, -Infinity, -Infinity];
    for (let i = 0; i < n; i += 1) {
      x0 = Math.min(x0, boxes[4 * i]); y0 = Math.min(y0, boxes[4 * i + 1]);
      x1 = Math.max(x1, boxes[4 * i + 2]); y1 = Math.max(y1, boxes[4 * i + 3]);
    }
    const side = Math.max(1, Math.min(1024, Math.ceil(Math.sqrt(n / 4))));
    const [width, height] = [Math.max(x1 - x0, 1e-12), Math.max(y1 - y0, 1e-12)];
    const column = (x) => Math.max(0, Math.min(side - 1, Math.floor(((x - x0) / width) * side)));
    const row = (y) => Math.max(0, Math.min(side - 1, Math.floor(((y - y0) / height) * side)));
    const cellsOf = (i, each) => {
      for (let r = row(boxes[4 * i + 1]); r <= row(boxes[4 * i + 3]); r += 1) {
        for (let c = column(boxes[4 * i]); c <= column(boxes[4 * i + 2]); c += 1) each(r * side + c);
      }
    };
    const starts = new Uint32Array(side * side + 1);
    for (let i = 0; i < n; i += 1) cellsOf(i, (cell) => { starts[cell + 1] += 1; });
    for (let cell = 0; cell < side * side; cell += 1) starts[cell + 1] += starts[cell];
    const items = new Uint32Array(starts[side * side]);
    const filled = starts.slice(0, side * side);
    for (let i = 0; i < n; i += 1) cellsOf(i, (cell) => { items[filled[cell]++] = i; });
    return {
      visit(qx0, qy0, qx1, qy1, each) {
        if (!n || qx1 < x0 || qx0 > x1 || qy1 < y0 || qy0 > y1) return;
        for (let r = row(qy0); r <= row(qy1); r += 1) {
          for (let c = column(qx0); c <= column(qx1); c += 1) {
            for (let k = starts[r * side + c]; k < starts[r * side + c + 1]; k += 1) each(items[k]);
          }
        }
      },
    };
  }

  function link(gl, vertexSource, fragmentSource) {
    const program = gl.createProgram();
    for (const [type, source] of [[gl.VERTEX_SHADER, vertexSource], [gl.FRAGMENT_SHADER, fragmentSource]]) {
      const shader = gl.createShader(type);
      gl.shaderSource(shader, source);
      gl.compileShader(shader);
      if (!gl.getShaderParameter(shader, gl.COMPILE_STATUS)) throw new Error(gl.getShaderInfoLog(shader));
      gl.attachShader(program, shader);
    }
    gl.linkProgram(program);
    if (!gl.getProgramParameter(program, gl.LINK_STATUS)) throw new Error(gl.getProgramInfoLog(program));
    return program;
  }

  return { create };
})();
