"""Move a reference face onto target landmarks: piecewise-affine warps over the mesh.

Stage 2 in mouth mode starts from a real picture of the person's mouth: the reference
frame whose lips best match the target shape, warped so its landmarks land on the
target's (IP_LAP's alignment idea without the learned part). A piecewise-affine warp
over a fixed triangulation is exact at every landmark (each triangle's corners map
onto each other), needs no solver, and costs one `cv2.remap` per frame, so it can run
at the source resolution, where the mouth's detail lives.

The triangulation is built once on a template shape (Delaunay over the sketch points
plus a ring of anchors around the face that map onto themselves), so source and target
always share connectivity. Pixels outside every triangle are left where they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np

from tccp.face.geometry import LOWER_INNER, UPPER_INNER, fill_vertices

__all__ = ["Triangulation", "triangulate", "warp_map", "moving_box", "warp_image", "warp_points", "rigid_mouth", "darken", "warp_images", "RIGID_TEETH",
           "MOUTH_CAVITY", "CAVITY_TONE"]

RIGID_TEETH = True
"""Inside the mouth opening, move what lies next to each lip rigidly with that lip
(`rigid_mouth`) instead of stretching the whole opening with the lips' gap: teeth do not
stretch when a mouth opens. Measured in docs/faces.md ("Teeth move with the lips")."""
RIGID_SHARE = 0.4
"""Part of the reference's opening, next to each lip, moved rigidly (the rest, the middle
of the opening, is stretched or cut)."""
MOUTH_CAVITY = 0.0
"""Darkening (0..1, at the middle of the opening) where the target's mouth opens far wider
than the reference's: the stretched middle is then a smear of the few pixels between the
reference's lips, where a real mouth shows its dark inside (`rigid_mouth`'s `cavity`).
Measured and off: docs/faces.md ("Mouth cavity")."""
CAVITY_TONE = 0.0
"""What the darkened middle fades to: this share of the mean colour under it (0: black,
a multiplication that keeps the smear's texture, fainter; > 0: a flat dark tone of the
person's own mouth colour, which hides the texture)."""


@dataclass
class Triangulation:
    """Triangles over `index` (mesh indices) + `n_anchor` anchors appended after them."""

    index: np.ndarray  # (P,) mesh indices of the points used
    triangles: np.ndarray  # (T, 3) rows into the (P + n_anchor) point list
    n_anchor: int


def _anchors(points: np.ndarray, n: int = 16, grow: float = 1.35) -> np.ndarray:
    """A ring of `n` points around the shape, `grow` times its radius from its centre."""
    c = points.mean(0)
    r = np.linalg.norm(points - c, axis=1).max() * grow
    ang = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return c + r * np.stack([np.cos(ang), np.sin(ang)], 1)


def triangulate(template: np.ndarray, index, n_anchor: int = 16) -> Triangulation:
    """Delaunay triangulation of template[index] plus an anchor ring."""
    from scipy.spatial import Delaunay

    idx = np.asarray(index)
    pts = np.asarray(template, np.float64)[idx]
    allp = np.concatenate([pts, _anchors(pts, n_anchor)])
    tri = Delaunay(allp).simplices.astype(np.int32)
    return Triangulation(idx, tri, n_anchor)


def _with_anchors(tri: Triangulation, mesh: np.ndarray, ref_shape: np.ndarray | None = None) -> np.ndarray:
    pts = np.asarray(mesh, np.float64)[tri.index]
    base = pts if ref_shape is None else np.asarray(ref_shape, np.float64)[tri.index]
    return np.concatenate([pts, _anchors(base, tri.n_anchor)])


def _point_lists(tri: Triangulation, src_mesh: np.ndarray, dst_mesh: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The triangulation's vertices in src and dst: the meshes' points, then the anchor
    ring placed around the *target* shape in both (anchors map onto themselves)."""
    src = _with_anchors(tri, src_mesh, dst_mesh)
    dst = _with_anchors(tri, dst_mesh, dst_mesh)
    src[-tri.n_anchor :] = dst[-tri.n_anchor :]
    return src, dst


def moving_box(tri: Triangulation, src_mesh: np.ndarray, dst_mesh: np.ndarray,
               min_px: float) -> tuple[float, float, float, float] | None:
    """(x0, y0, x1, y1) in dst coordinates bounding the triangles of `warp_map(tri,
    src_mesh, dst_mesh)` with a vertex displaced by more than `min_px`, or None. The
    piecewise-affine field is linear inside each triangle, so outside that box it moves
    nothing by more than `min_px` (before `rigid_mouth`, which acts inside the mouth)."""
    src, dst = _point_lists(tri, src_mesh, dst_mesh)
    moves = np.linalg.norm(src - dst, axis=1) > min_px
    hit = moves[tri.triangles].any(1)
    if not hit.any():
        return None
    pts = dst[tri.triangles[hit]].reshape(-1, 2)
    (x0, y0), (x1, y1) = pts.min(0), pts.max(0)
    return float(x0), float(y0), float(x1), float(y1)


def warp_map(tri: Triangulation, src_mesh: np.ndarray, dst_mesh: np.ndarray, shape: tuple[int, int],
             offset: tuple[float, float] = (0.0, 0.0), align: bool = False, cavity: np.ndarray | None = None,
             step: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Backward map for an output of `shape` (h, w) whose pixel (0, 0) sits at `offset`
    in dst coordinates: (map_x, map_y) in src coordinates (continuous px, cv2.remap's
    pixel-centre convention applied) and the `inside` mask (h, w) bool.

    Anchors are placed around the *target* shape and map onto themselves, so the warp
    fades to identity away from the face. That suits a mouth edit, where source and
    target heads stand where the reference's did; `align` (head mode, where the whole
    head moves) first moves the source by the similarity that best fits its skull
    points (`tccp.face.headframe.STABLE`) onto the target's, so hair, ears and the
    background around the head follow the head instead of staying behind. `cavity`, an
    (h, w) float32 array, receives `rigid_mouth`'s darkening weights. `step` > 1: the
    piecewise-affine part is computed every `step` px and interpolated bilinearly (exact
    inside each triangle, its kinks at triangle edges rounded over `step` px; `inside`
    then approximate), `step`^2 times less per-pixel work, for large smooth areas;
    `rigid_mouth` stays at full resolution."""
    if align:
        from tccp.face.headframe import STABLE, apply_similarity, similarity

        idx = list(STABLE)
        a, b = similarity(np.asarray(src_mesh, np.float64)[idx], np.asarray(dst_mesh, np.float64)[idx])
        mx, my, inside = warp_map(tri, apply_similarity(a, b, src_mesh), dst_mesh, shape, offset, cavity=cavity,
                                  step=step)
        z = ((mx.astype(np.float64) + 0.5) + 1j * (my.astype(np.float64) + 0.5) - b) / a
        return (z.real - 0.5).astype(np.float32), (z.imag - 0.5).astype(np.float32), inside
    src, dst = _point_lists(tri, src_mesh, dst_mesh)
    if step > 1:
        map_x, map_y, inside = _piecewise_affine_coarse(tri, src, dst, shape, offset, step)
    else:
        map_x, map_y, inside = _piecewise_affine(tri, src, dst, shape, offset)
    if RIGID_TEETH:
        rigid_mouth(map_x, map_y, src_mesh, dst_mesh, offset, cavity=cavity)
    return map_x, map_y, inside


def _piecewise_affine(tri: Triangulation, src: np.ndarray, dst: np.ndarray, shape: tuple[int, int],
                      offset: tuple[float, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`warp_map`'s piecewise-affine part, on the point lists with their anchors."""
    h, w = shape
    ox, oy = offset
    d = dst[tri.triangles]
    mats, live = _affines(d, src[tri.triangles])  # all triangles at once
    # only triangles that reach the output rectangle are drawn (a mouth region needs
    # about half of the face's)
    lo, hi = d.min(1), d.max(1)
    live &= (hi[:, 0] >= ox - 1) & (lo[:, 0] <= ox + w + 1) & (hi[:, 1] >= oy - 1) & (lo[:, 1] <= oy + h + 1)
    label = np.full((h, w), -1, np.int32)
    shift = 4  # sub-pixel vertices for fillConvexPoly
    polys = np.round((d - [ox + 0.5, oy + 0.5]) * (1 << shift)).astype(np.int32)
    for k in np.flatnonzero(live):
        cv2.fillConvexPoly(label, polys[k], int(k), lineType=cv2.LINE_8, shift=shift)
    inside = label >= 0
    sx = np.arange(w, dtype=np.float32)[None, :] + np.float32(ox)  # = pixel centre - 0.5
    sy = np.arange(h, dtype=np.float32)[:, None] + np.float32(oy)
    map_x = np.broadcast_to(sx, (h, w)).copy()
    map_y = np.broadcast_to(sy, (h, w)).copy()
    ys, xs = np.nonzero(inside)
    if ys.size:
        c = mats.reshape(-1, 6)[label[ys, xs]]  # float64: sliver triangles have large coefficients
        x = xs + (ox + 0.5)  # continuous coordinates of pixel centres
        y = ys + (oy + 0.5)
        map_x[ys, xs] = c[:, 0] * x + c[:, 1] * y + (c[:, 2] - 0.5)
        map_y[ys, xs] = c[:, 3] * x + c[:, 4] * y + (c[:, 5] - 0.5)
    return map_x, map_y, inside


def _piecewise_affine_coarse(tri: Triangulation, src: np.ndarray, dst: np.ndarray, shape: tuple[int, int],
                             offset: tuple[float, float], step: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`_piecewise_affine` on a grid `step` times coarser, upsampled bilinearly.

    Coarse node j (per axis) sits at fine pixel step * (j - 1) + (step - 1) / 2, which is
    where `cv2.resize(INTER_LINEAR)` by `step` puts it; one node of margin on each side
    keeps the fine grid inside the coarse one (no clamped extrapolation at the edges)."""
    h, w = shape
    ox, oy = offset
    hc, wc = -(-h // step) + 2, -(-w // step) + 2
    cx, cy, cin = _piecewise_affine(tri, src / step, dst / step, (hc, wc), (ox / step - 1.0, oy / step - 1.0))
    size = (wc * step, hc * step)
    fine = [cv2.resize(step * (c + 0.5) - 0.5, size, interpolation=cv2.INTER_LINEAR)[step:step + h, step:step + w]
            for c in (cx, cy)]
    inside = cv2.resize(cin.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)[step:step + h, step:step + w]
    return np.ascontiguousarray(fine[0]), np.ascontiguousarray(fine[1]), inside.astype(bool)


def _contour(points: np.ndarray, c0: np.ndarray, e: np.ndarray, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A lip contour in the mouth's frame: (along the corner axis, across it), sorted along."""
    rel = points - c0
    a, b = rel @ e, rel @ n
    order = np.argsort(a, kind="stable")
    return a[order], b[order]


def _mouth_frame(mesh: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float] | None:
    """(left corner, unit axis to the right corner, unit normal towards the chin, corner
    distance), or None for a degenerate mouth."""
    c0, c1 = mesh[UPPER_INNER[0]], mesh[UPPER_INNER[-1]]
    length = float(np.linalg.norm(c1 - c0))
    if length < 1e-6:
        return None
    e = (c1 - c0) / length
    n = np.array([-e[1], e[0]])
    if (mesh[152] - mesh[13]) @ n < 0:  # 152: the chin
        n = -n
    return c0, e, n, length


def rigid_mouth(map_x: np.ndarray, map_y: np.ndarray, src_mesh: np.ndarray, dst_mesh: np.ndarray,
                offset: tuple[float, float] = (0.0, 0.0), share: float | None = None,
                cavity: np.ndarray | None = None, strength: float | None = None) -> None:
    """Redo a backward map (in place) inside the target's mouth opening so that teeth move
    with the lips instead of stretching with the gap between them.

    The piecewise-affine warp maps the opening between the inner lips linearly: a target
    opening twice the reference's stretches the reference's teeth to twice their height
    (the "bent teeth" of docs/faces.md). Here, along each column of the opening (the
    corners' axis, matched corner to corner), a band next to each lip (`share` of the
    reference's opening, at the reference's scale) moves rigidly with that lip, as upper
    teeth move with the upper jaw and lower teeth with the chin; the middle of the
    opening (usually the dark inside of the mouth) takes up the difference, stretched,
    and a target that opens less than the reference cuts into the bands from the middle
    (the teeth disappear behind the lips, as they do). On the lip contours the map is the
    piecewise-affine one's, so nothing moves at the boundary.

    `cavity` (h, w, like the maps) receives, where the middle is stretched to more than
    1.5x the reference's middle, a darkening weight: `strength` (default MOUTH_CAVITY) times
    the share of the middle that is new (its target height less 1.5x its reference height,
    over its target height), times that new height against a tenth of the mouth's width (a
    few new pixels near a corner stay light), times a bump across the middle that is 0 at
    the teeth bands. The caller darkens the warped image by it (`darken`)."""
    share = RIGID_SHARE if share is None else share
    strength = MOUTH_CAVITY if strength is None else strength
    src, dst = np.asarray(src_mesh, np.float64), np.asarray(dst_mesh, np.float64)
    fs, fd = _mouth_frame(src), _mouth_frame(dst)
    if fs is None or fd is None:
        return
    c0, e, n, length = fd
    ua, ub = _contour(dst[list(UPPER_INNER)], c0, e, n)
    la, lb = _contour(dst[list(LOWER_INNER)], c0, e, n)
    sc0, se, sn, slength = fs
    sua, sub = _contour(src[list(UPPER_INNER)], sc0, se, sn)
    sla, slb = _contour(src[list(LOWER_INNER)], sc0, se, sn)
    # the reference's scale over the target's (teeth keep their size in the head frame)
    eyes = np.linalg.norm(src[33] - src[263]) / max(np.linalg.norm(dst[33] - dst[263]), 1e-9)
    # the target's opening in output pixels
    poly = np.concatenate([dst[list(UPPER_INNER)], dst[list(LOWER_INNER)][::-1]]) - np.asarray(offset)
    h, w = map_x.shape
    x0, y0 = np.floor(poly.min(0)).astype(int)
    x1, y1 = np.ceil(poly.max(0)).astype(int) + 1
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if x1 <= x0 or y1 <= y0:
        return
    # candidate pixels: the opening's polygon, drawn one pixel wider (the exact test follows)
    cand = np.zeros((y1 - y0, x1 - x0), np.uint8)
    cv2.fillPoly(cand, [fill_vertices(poly, 4, (x0, y0))], 1, cv2.LINE_8, shift=4)
    cand = cv2.dilate(cand, np.ones((3, 3), np.uint8))
    ys, xs = np.nonzero(cand)
    if not ys.size:
        return
    ys, xs = ys + y0, xs + x0
    px, py = xs + (offset[0] + 0.5 - c0[0]), ys + (offset[1] + 0.5 - c0[1])  # pixel centres
    a, b = px * e[0] + py * e[1], px * n[0] + py * n[1]
    top, bot = np.interp(a, ua, ub), np.interp(a, la, lb)
    gap = bot - top
    keep = (a > 0) & (a < length) & (b > top) & (b < bot) & (gap > 1e-3)
    if not keep.any():
        return
    ys, xs = ys[keep], xs[keep]
    a, b, top, gap = a[keep], b[keep], top[keep], gap[keep]
    sa = a / length * slength  # the same place along the reference's mouth
    stop = np.interp(sa, sua, sub)
    sgap = np.maximum(np.interp(sa, sla, slb) - stop, 0.0)
    d = b - top  # distance below the target's upper lip
    band = share * sgap / eyes  # a rigid band, in target px
    cut = gap < 2 * band  # the target opens less than the two bands: cut them in the middle
    band = np.where(cut, gap / 2, band)
    upper = d <= band
    lower = d >= gap - band
    sd = np.where(upper, d * eyes, np.where(lower, sgap - (gap - d) * eyes, 0.0))
    mid = ~(upper | lower)
    if mid.any():  # stretch the reference's middle onto the target's
        t = (d[mid] - band[mid]) / np.maximum(gap[mid] - 2 * band[mid], 1e-9)
        s_lo = share * sgap[mid]
        sd[mid] = s_lo + t * (sgap[mid] - 2 * s_lo)
        if cavity is not None and strength > 0:
            tmid = gap[mid] - 2 * band[mid]  # the middle's height in the target, px
            smid = (1 - 2 * share) * sgap[mid] / eyes  # the reference's, in target px
            grown = tmid - 1.5 * smid  # opening the reference cannot show, px
            new = np.clip(grown / np.maximum(tmid, 1e-9), 0.0, 1.0) * np.clip(grown / (0.1 * length), 0.0, 1.0)
            cavity[ys[mid], xs[mid]] = strength * new * np.sin(np.pi * t)  # t in (0, 1) in the middle
    depth = stop + sd
    map_x[ys, xs] = sc0[0] + sa * se[0] + depth * sn[0] - 0.5
    map_y[ys, xs] = sc0[1] + sa * se[1] + depth * sn[1] - 0.5


def _affines(d: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(T, 2, 3) affine maps taking each dst triangle (T, 3, 2) onto its src triangle,
    and which triangles are non-degenerate (the others get zeros and are not drawn).
    Closed form, elementwise: no BLAS call, whose worker threads spin against the
    engine's own on a busy CPU (measured: slower than a Python loop there)."""
    e1, e2 = d[:, 1] - d[:, 0], d[:, 2] - d[:, 0]
    f1, f2 = s[:, 1] - s[:, 0], s[:, 2] - s[:, 0]
    det = e1[:, 0] * e2[:, 1] - e2[:, 0] * e1[:, 1]
    live = np.abs(det) >= 1e-9
    inv = np.where(live, 1.0 / np.where(live, det, 1.0), 0.0)
    # A = [f1 f2] @ inverse([e1 e2]); t = s0 - A d0
    i00, i01, i10, i11 = e2[:, 1] * inv, -e2[:, 0] * inv, -e1[:, 1] * inv, e1[:, 0] * inv
    mats = np.zeros((len(d), 2, 3))
    for r in range(2):
        mats[:, r, 0] = f1[:, r] * i00 + f2[:, r] * i10
        mats[:, r, 1] = f1[:, r] * i01 + f2[:, r] * i11
        mats[:, r, 2] = s[:, 0, r] - mats[:, r, 0] * d[:, 0, 0] - mats[:, r, 1] * d[:, 0, 1]
    mats[~live] = 0.0
    return mats, live


def darken(image: np.ndarray, cavity: np.ndarray, tone: float | None = None) -> np.ndarray:
    """`image` (h, w[, c], uint8 or float) faded by `cavity` towards `tone` (default
    CAVITY_TONE) times its mean colour under the cavity, in its own dtype."""
    under = cavity > 0
    if not under.any():
        return image
    tone = CAVITY_TONE if tone is None else tone
    c = cavity if image.ndim == 2 else cavity[..., None]
    out = image.astype(np.float32) * (1.0 - c)
    if tone > 0:
        out += c * (tone * image[under].astype(np.float32).mean(0))
    return np.clip(np.round(out), 0, 255).astype(image.dtype) if image.dtype == np.uint8 else out.astype(image.dtype)


def warp_images(images: Sequence[np.ndarray], tri: Triangulation, src_mesh: np.ndarray, dst_mesh: np.ndarray,
                shape: tuple[int, int] | None = None, offset: tuple[float, float] = (0.0, 0.0),
                src_offset: tuple[float, float] = (0.0, 0.0), align: bool = False,
                pictures: Sequence[bool] | None = None) -> list[np.ndarray]:
    """`warp_image` of several images of one frame (a picture and its masks, say) with one
    map: the map is the costly part (~3 ms at 128 px). `pictures[i]` False: image i is a
    mask and never gets the cavity darkening (default: all pictures)."""
    pictures = [True] * len(images) if pictures is None else list(pictures)
    shape = shape or images[0].shape[:2]
    cavity = np.zeros(shape, np.float32) if any(pictures) and MOUTH_CAVITY > 0 else None
    mx, my, _ = warp_map(tri, src_mesh, dst_mesh, shape, offset, align=align, cavity=cavity)
    mx, my = mx - src_offset[0], my - src_offset[1]
    out = []
    for image, picture in zip(images, pictures):
        warped = cv2.remap(image, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        out.append(darken(warped, cavity) if picture and cavity is not None else warped)
    return out


def warp_image(image: np.ndarray, tri: Triangulation, src_mesh: np.ndarray, dst_mesh: np.ndarray,
               shape: tuple[int, int] | None = None, offset: tuple[float, float] = (0.0, 0.0),
               src_offset: tuple[float, float] = (0.0, 0.0), align: bool = False, picture: bool = True) -> np.ndarray:
    """Warp `image` (whose pixel (0, 0) sits at `src_offset` in src coordinates) so that
    src_mesh lands on dst_mesh; output `shape` (default: image's) at `offset`; `align`
    as in `warp_map`. A `picture` (not a mask) gets the mouth's cavity darkening
    (`MOUTH_CAVITY`)."""
    return warp_images([image], tri, src_mesh, dst_mesh, shape, offset, src_offset, align, [picture])[0]


def warp_points(tri: Triangulation, src_mesh: np.ndarray, dst_mesh: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Where src-space `points` (K, 2) go under the forward warp src -> dst (for tests and
    overlays): each point is mapped through the src triangle that contains it."""
    src, dst = _point_lists(tri, src_mesh, dst_mesh)
    out = np.asarray(points, np.float64).copy()
    for i, p in enumerate(points):
        for t in tri.triangles:
            s = src[t]
            m = np.array([[s[1, 0] - s[0, 0], s[2, 0] - s[0, 0]], [s[1, 1] - s[0, 1], s[2, 1] - s[0, 1]]])
            if abs(np.linalg.det(m)) < 1e-12:
                continue
            u, v = np.linalg.solve(m, p - s[0])
            if u >= -1e-9 and v >= -1e-9 and u + v <= 1 + 1e-9:
                d = dst[t]
                out[i] = d[0] + u * (d[1] - d[0]) + v * (d[2] - d[0])
                break
    return out.astype(np.float32)
