"""Procedural X-ray-angiography-like frames with vessel masks, deterministic from a seed.

Each "video" is one vessel tree (one or two roots: curved centrelines, tapering radii of about 7 down
to 0.7 px, branches that cross, a few anastomoses that close loops) seen over several frames while it
deforms a little (a cardiac-like wobble plus drift). A frame is a textured background (soft blobs,
rib-like bands, collimator vignetting), the vessels as attenuation (thicker = darker, crossings add up),
in some videos a catheter (a constant-width tube, labelled as its own structure), then blur, noise and
JPEG compression.

Files follow the real data's naming, ``images/<Patient Name>(<id>)_<seq>_<hash>_frame_<NNNNNN>.jpg``,
with one mask folder per structure (the multi-structure layout): ``masks/blood vessel/<same stem>_mask.png``
for every frame and ``masks/catheter/<same stem>_mask.png`` (0/255) for frames that show a catheter
(frames without one have no catheter object). A marker file records the generator and its parameters:
we only ever write into an empty folder or one holding our own marker, so data we did not generate is
never overwritten.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from sa2va_pipeline.data.image_io import encode_jpeg, encode_png

log = logging.getLogger(__name__)

MARKER_NAME = ".sa2va_synthetic.json"
# The phrases of the two labelled structures: the names of their mask folders.
VESSEL_PHRASE = "blood vessel"
CATHETER_PHRASE = "catheter"
GENERATOR = "sa2va_pipeline.data.synthetic"
GENERATOR_VERSION = 2  # bump when the drawing changes, so an old sample is regenerated (2: catheter labelled)

_FIRST_NAMES = ["Anna", "Jürgen", "Maria", "Tomasz", "Zoë", "Hiroshi", "Fatima", "Lars", "Chloé", "Rafael", "Ingrid",
                "Kofi"]
_LAST_NAMES = ["Berg", "Weiß", "Nowak", "O'Neill", "Tanaka", "Haddad", "Svensson", "Dubois", "Silva", "Müller",
               "Mensah", "Rossi"]


class ForeignDataError(RuntimeError):
    """The output folder holds files this generator did not write; we refuse to touch it."""


@dataclass(frozen=True)
class SampleSpec:
    """Parameters of the synthetic sample (see ``conf/base/parameters_sample_data.yml``)."""

    seed: int = 42
    n_videos: int = 9
    frames_per_video: int = 7
    videos_per_patient_max: int = 3
    size: int = 512
    n_new_images: int = 4
    jpeg_quality_min: int = 72
    jpeg_quality_max: int = 92
    catheter_probability: float = 0.5
    noise_sigma: float = 7.0
    vessel_width_scale: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for the marker and for comparisons)."""
        return asdict(self)


# ------------------------------------------------------------------------------------ vessel trees
@dataclass
class Branch:
    """A vessel centreline: points ``(n, 2)`` in pixels and radii ``(n,)``."""

    points: np.ndarray
    radii: np.ndarray


@dataclass
class VideoScene:
    """Everything that stays fixed over the frames of one video."""

    branches: list[Branch]
    catheter: np.ndarray | None  # (n, 2) centreline, or None
    catheter_radius: float
    background: np.ndarray  # (S, S) float32 gray levels
    motion: dict[str, float] = field(default_factory=dict)


def _grow_branch(rng: np.random.Generator, start: np.ndarray, angle: float, radius: float, size: int,
                 depth: int, budget: list[int]) -> tuple[Branch | None, list[tuple[np.ndarray, float, float, int]]]:
    """Grow one centreline from ``start``; returns it and the side branches it gives off (not yet grown)."""
    step = 1.0
    pts, rads = [start.astype(np.float64)], [radius]
    curvature = rng.normal(0, 0.004)
    # trunks taper slowly and run across the frame; side branches are shorter
    decay = rng.uniform(0.0012, 0.0022) if depth == 0 else rng.uniform(0.0030, 0.0060)
    spacing = (30, 70) if depth == 0 else (18, 50)
    next_branch = rng.uniform(*spacing)
    travelled = 0.0
    pos = start.astype(np.float64)
    r = radius
    children: list[tuple[np.ndarray, float, float, int]] = []
    while r >= 0.7 and budget[0] > 0:
        # mean-reverting curvature: gently curved centrelines that do not curl up
        curvature = float(np.clip(0.97 * curvature + rng.normal(0, 0.0025), -0.02, 0.02))
        angle += curvature * step
        pos = pos + step * np.array([math.cos(angle), math.sin(angle)])
        travelled += step
        r *= math.exp(-decay * step)
        budget[0] -= 1
        if not (-20 <= pos[0] <= size + 20 and -20 <= pos[1] <= size + 20):
            break
        pts.append(pos.copy())
        rads.append(r)
        if travelled >= next_branch and depth < 6 and r > 1.1:
            side = 1 if rng.random() < 0.5 else -1
            children.append((pos.copy(), angle + side * rng.uniform(0.4, 1.1), max(0.7, r * rng.uniform(0.4, 0.8)), depth + 1))
            r *= rng.uniform(0.9, 0.98)  # the parent narrows after giving off a branch
            travelled = 0.0
            next_branch = rng.uniform(*spacing)
    branch = Branch(points=np.array(pts), radii=np.array(rads)) if len(pts) > 2 else None
    return branch, children


def _grow_tree(rng: np.random.Generator, start: np.ndarray, angle: float, radius: float, size: int,
               budget: int, out: list[Branch]) -> None:
    """Grow a tree breadth-first (trunk, then its branches, ...) until the length budget is spent."""
    pending = [(start, angle, radius, 0)]
    left = [budget]
    while pending and left[0] > 0:
        s, a, r, depth = pending.pop(0)
        branch, children = _grow_branch(rng, s, a, r, size, depth, left)
        if branch is not None:
            out.append(branch)
        pending.extend(children)


def _anastomosis(rng: np.random.Generator, branches: list[Branch]) -> Branch | None:
    """A thin curved vessel joining two points of different branches: closes a loop."""
    if len(branches) < 2:
        return None
    for _ in range(20):
        a, b = rng.choice(len(branches), 2, replace=False)
        pa = branches[a].points[rng.integers(len(branches[a].points))]
        pb = branches[b].points[rng.integers(len(branches[b].points))]
        dist = float(np.linalg.norm(pb - pa))
        if 25 < dist < 110:
            n = int(dist) + 1
            t = np.linspace(0, 1, n)
            normal = np.array([-(pb - pa)[1], (pb - pa)[0]]) / dist
            bend = rng.uniform(-0.35, 0.35) * dist
            pts = pa[None] + t[:, None] * (pb - pa)[None] + (np.sin(np.pi * t) * bend)[:, None] * normal[None]
            radius = rng.uniform(0.8, 1.8)
            return Branch(points=pts, radii=np.full(n, radius))
    return None


def _tree(rng: np.random.Generator, size: int, spec_budget: float = 16.0) -> list[Branch]:
    """One or two arterial trees entering from the image border, plus one or two loops."""
    branches: list[Branch] = []
    target = int(spec_budget * size)
    for root in range(3):  # a trunk that leaves the frame early leaves budget: add another root
        grown = sum(len(b.points) for b in branches)
        if grown >= 0.7 * target:
            break
        side = rng.integers(4)
        u = rng.uniform(0.15, 0.85) * size
        start = [np.array([u, -5.0]), np.array([size + 5.0, u]), np.array([u, size + 5.0]), np.array([-5.0, u])][side]
        towards = np.array([size / 2, size / 2]) + rng.normal(0, size * 0.12, 2) - start
        angle = math.atan2(towards[1], towards[0]) + rng.normal(0, 0.25)
        share = (target - grown) if root else target // (1 if rng.random() < 0.4 else 2)
        _grow_tree(rng, start, angle, rng.uniform(4.5, 7.5), size, share, branches)
    for _ in range(int(rng.integers(1, 3))):
        loop = _anastomosis(rng, branches)
        if loop is not None:
            branches.append(loop)
    return branches


def _catheter(rng: np.random.Generator, size: int) -> np.ndarray:
    """A long, smooth, constant-width tube from the image border (labelled ``catheter``, never ``blood vessel``)."""
    start = np.array([rng.uniform(0.2, 0.8) * size, size + 10.0])
    angle = -math.pi / 2 + rng.normal(0, 0.3)
    pts, pos, curvature = [start], start.copy(), rng.normal(0, 0.004)
    for _ in range(int(size * rng.uniform(0.7, 1.2))):
        curvature = float(np.clip(curvature + rng.normal(0, 0.0008), -0.012, 0.012))
        angle += curvature
        pos = pos + np.array([math.cos(angle), math.sin(angle)])
        pts.append(pos.copy())
    return np.array(pts)


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    small = max(8, int(size / sigma))
    field_ = rng.normal(0, 1, (small, small)).astype(np.float32)
    field_ = cv2.resize(field_, (size, size), interpolation=cv2.INTER_CUBIC)
    return field_ / (field_.std() + 1e-6)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Soft anatomy-like texture: multi-scale blobs, rib-like bands, collimator vignetting."""
    base = rng.uniform(150, 185)
    bg = np.full((size, size), base, np.float32)
    bg += 14 * _smooth_noise(rng, size, 120) + 7 * _smooth_noise(rng, size, 40) + 3 * _smooth_noise(rng, size, 12)
    bands = np.zeros((size, size), np.uint8)
    for _ in range(int(rng.integers(2, 5))):  # ribs: broad curved darker bands
        y0 = rng.uniform(0, size)
        xs = np.linspace(-20, size + 20, 40)
        ys = y0 + rng.uniform(-0.4, 0.4) * xs + rng.uniform(-40, 40) * np.sin(xs / size * np.pi)
        cv2.polylines(bands, [np.stack([xs, ys], 1).astype(np.int32)], False, 255, int(rng.integers(16, 34)))
    bg -= rng.uniform(10, 22) * cv2.GaussianBlur(bands.astype(np.float32) / 255, (0, 0), 7)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cx, cy = size / 2 + rng.normal(0, 15, 2)
    rr = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2) / (size * 0.62)
    bg *= np.clip(1.08 - 0.35 * rr**2.5, 0.45, 1.1)
    return bg


def _scene(rng: np.random.Generator, spec: SampleSpec) -> VideoScene:
    branches = _tree(rng, spec.size)
    catheter = _catheter(rng, spec.size) if rng.random() < spec.catheter_probability else None
    return VideoScene(
        branches=branches,
        catheter=catheter,
        catheter_radius=float(rng.uniform(1.6, 2.4)),
        background=_background(rng, spec.size),
        motion={
            "amp": float(rng.uniform(2.0, 5.0)),
            "wavelength": float(rng.uniform(250, 450)),
            "phase": float(rng.uniform(0, 2 * np.pi)),
            "omega": float(rng.uniform(0.5, 1.1)),
            "drift_x": float(rng.normal(0, 0.8)),
            "drift_y": float(rng.normal(0, 0.8)),
            "pulse": float(rng.uniform(0.01, 0.03)),
        },
    )


def _deform(points: np.ndarray, motion: dict[str, float], t: float, size: int) -> np.ndarray:
    """Smooth, slightly non-rigid motion: a sinusoidal wobble, a cardiac-like pulse and a drift."""
    ph = motion["phase"] + motion["omega"] * t
    k = 2 * np.pi / motion["wavelength"]
    x, y = points[:, 0], points[:, 1]
    centre = size / 2
    pulse = 1 + motion["pulse"] * math.sin(ph)
    dx = motion["amp"] * np.sin(k * y + ph) + motion["drift_x"] * t + (x - centre) * (pulse - 1)
    dy = motion["amp"] * np.cos(k * x + 0.7 * ph) + motion["drift_y"] * t + (y - centre) * (pulse - 1)
    return np.stack([x + dx, y + dy], axis=1)


def _draw_tube(canvas: np.ndarray, points: np.ndarray, radii: np.ndarray | float, value: float) -> None:
    """Stamp filled discs along a centreline (1/16-px precision) into ``canvas``."""
    radii = np.broadcast_to(np.asarray(radii, dtype=np.float64), (len(points),))
    shift = 4
    centres = np.round(points * (1 << shift)).astype(np.int64)
    rad = np.round(np.maximum(radii, 0.5) * (1 << shift)).astype(np.int64)
    for (cx, cy), r in zip(centres.tolist(), rad.tolist()):
        cv2.circle(canvas, (cx, cy), r, value, -1, cv2.LINE_8, shift)


def render_frame(
    scene: VideoScene, spec: SampleSpec, t: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Draw one frame of a scene at time ``t``: ``(gray uint8 (S, S), vessel mask uint8 0/1 (S, S),
    catheter mask uint8 0/1 (S, S) or None when the frame shows no catheter)``.

    ``spec.vessel_width_scale`` scales every vessel radius as drawn (the trees themselves stay the same).
    """
    s = spec.size
    mask = np.zeros((s, s), np.uint8)
    attenuation = np.zeros((s, s), np.float32)
    tube = np.zeros((s, s), np.float32)
    for branch in scene.branches:
        pts = _deform(branch.points, scene.motion, t, s)
        radii = branch.radii * spec.vessel_width_scale
        _draw_tube(mask, pts, radii, 1)
        # X-ray attenuation grows with the path length through the vessel: thick vessels are darker;
        # drawing each branch on its own and adding makes crossings darker still.
        tube[:] = 0
        lo = np.maximum(np.floor(pts.min(0) - 9).astype(int), 0)
        hi = np.minimum(np.ceil(pts.max(0) + 9).astype(int), s)
        if (hi <= lo).any():
            continue
        sub = tube[lo[1]:hi[1], lo[0]:hi[0]]
        _draw_tube(sub, pts - lo, radii, 1.0)
        core = np.zeros_like(sub)
        _draw_tube(core, pts - lo, radii * 0.55, 1.0)
        thickness = np.interp(np.arange(len(pts)), np.arange(len(pts)), radii).mean()
        strength = 22.0 + 6.0 * min(thickness, 6.0)
        attenuation[lo[1]:hi[1], lo[0]:hi[0]] += strength * sub + 0.5 * strength * core
    attenuation = cv2.GaussianBlur(attenuation, (0, 0), 0.9)
    frame = scene.background - attenuation
    catheter = None
    if scene.catheter is not None:
        cath = np.zeros((s, s), np.float32)
        _draw_tube(cath, _deform(scene.catheter, scene.motion, t, s), scene.catheter_radius, 1.0)
        frame -= 55.0 * cv2.GaussianBlur(cath, (0, 0), 0.6)
        catheter = (cath > 0).astype(np.uint8)
        catheter = catheter if catheter.any() else None
    # quantum-like noise: fine grain plus a little correlated noise
    noise = rng.normal(0, spec.noise_sigma, (s, s)).astype(np.float32)
    noise = 0.8 * noise + 0.6 * cv2.GaussianBlur(noise, (0, 0), 1.2) * 2.0
    frame = cv2.GaussianBlur(frame + noise, (0, 0), 0.6)
    return np.clip(frame, 0, 255).astype(np.uint8), mask, catheter


# ------------------------------------------------------------------------------------- file layout
@dataclass(frozen=True)
class VideoInfo:
    """Naming of one synthetic video."""

    patient: str
    patient_id: int
    seq: int
    hash: str
    first_frame: int
    frame_step: int

    def stem(self, i: int) -> str:
        """File stem of the ``i``-th frame of this video."""
        n = self.first_frame + i * self.frame_step
        return f"{self.patient}({self.patient_id})_{self.seq}_{self.hash}_frame_{n:06d}"


def _videos(rng: np.random.Generator, n_videos: int, per_patient_max: int, offset: int = 0) -> list[VideoInfo]:
    """Name ``n_videos`` videos; patients get 1..per_patient_max sequences, so some have several."""
    videos: list[VideoInfo] = []
    p = 0
    while len(videos) < n_videos:
        name = f"{_FIRST_NAMES[(p + offset) % len(_FIRST_NAMES)]} {_LAST_NAMES[(3 * p + offset) % len(_LAST_NAMES)]}"
        pid = int(rng.integers(10000, 99999))
        n_seq = int(rng.integers(1, per_patient_max + 1)) if p % 2 == 0 else int(rng.integers(min(2, per_patient_max), per_patient_max + 1))
        seq = int(rng.integers(1, 6))
        for _ in range(min(n_seq, n_videos - len(videos))):
            videos.append(VideoInfo(name, pid, seq, f"{int(rng.integers(0, 2**32)):08x}",
                                    int(rng.integers(0, 60)), int(rng.integers(2, 6))))
            seq += int(rng.integers(1, 3))
        p += 1
    return videos


# ---------------------------------------------------------------------------------- marker + safety
def _marker(folder: Path) -> dict[str, Any] | None:
    path = folder / MARKER_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) and data.get("generator") == GENERATOR else None


def _existing_files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} - {MARKER_NAME}


def plan_folder(folder: Path, params: dict[str, Any]) -> str:
    """Decide what to do with an output folder: ``"generate"``, ``"up_to_date"`` or ``"regenerate"``.

    Raises:
        ForeignDataError: the folder holds files without our marker, or files our marker does not list.
    """
    if not folder.exists():
        return "generate"
    if not folder.is_dir():
        raise ForeignDataError(f"'{folder}' exists and is not a folder; the sample generator will not touch it")
    existing = _existing_files(folder)
    marker = _marker(folder)
    if marker is None:
        if existing or (folder / MARKER_NAME).exists():
            raise ForeignDataError(
                f"'{folder}' holds {len(existing)} file(s) the sample generator did not write (no marker "
                f"{MARKER_NAME}); it will not overwrite them. Move them away or point sample_data.output_dir "
                "elsewhere."
            )
        return "generate"
    listed = set(marker.get("files", []))
    foreign = existing - listed
    if foreign:
        raise ForeignDataError(
            f"'{folder}' holds {len(foreign)} file(s) the sample generator did not write, e.g. "
            f"{sorted(foreign)[:3]}; it will not overwrite the folder. Remove them or choose another output_dir."
        )
    if marker.get("complete") and marker.get("params") == params and listed <= existing:
        return "up_to_date"
    return "regenerate"


def _write_marker(folder: Path, params: dict[str, Any], files: list[str], complete: bool) -> None:
    payload = {"generator": GENERATOR, "params": params, "complete": complete, "files": sorted(files)}
    (folder / MARKER_NAME).write_text(json.dumps(payload, indent=1, ensure_ascii=False), encoding="utf-8")


def _clear_ours(folder: Path) -> None:
    marker = _marker(folder) or {}
    for name in marker.get("files", []):
        path = folder / name
        if path.is_file():
            path.unlink()


def _write_folder(folder: Path, params: dict[str, Any], files: dict[str, bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    # the marker goes first (incomplete), so a crash midway leaves a folder we still recognise as ours
    _write_marker(folder, params, list(files), complete=False)
    for name, payload in files.items():
        out = folder / name
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(payload)
    _write_marker(folder, params, list(files), complete=True)


# ------------------------------------------------------------------------------------------ public
def render_video(
    spec: SampleSpec, seed_seq: np.random.SeedSequence, n_frames: int
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """Render ``n_frames`` frames (gray, vessel mask, catheter mask or None) of one video from its own seed."""
    rng = np.random.default_rng(seed_seq)
    scene = _scene(rng, spec)
    return [render_frame(scene, spec, float(i), rng) for i in range(n_frames)]


def _labelled_files(spec: SampleSpec) -> dict[str, bytes]:
    root = np.random.SeedSequence(spec.seed)
    naming_seq, videos_seq, _new_seq = root.spawn(3)
    videos = _videos(np.random.default_rng(naming_seq), spec.n_videos, spec.videos_per_patient_max)
    files: dict[str, bytes] = {}
    quality_rng = np.random.default_rng(root.spawn(1)[0])
    for info, seq in zip(videos, videos_seq.spawn(spec.n_videos)):
        quality = int(quality_rng.integers(spec.jpeg_quality_min, spec.jpeg_quality_max + 1))
        for i, (gray, mask, catheter) in enumerate(render_video(spec, seq, spec.frames_per_video)):
            stem = info.stem(i)
            files[f"images/{stem}.jpg"] = encode_jpeg(np.repeat(gray[:, :, None], 3, axis=2), quality)
            files[f"masks/{VESSEL_PHRASE}/{stem}_mask.png"] = encode_png(mask * 255)
            if catheter is not None:
                files[f"masks/{CATHETER_PHRASE}/{stem}_mask.png"] = encode_png(catheter * 255)
    return files


def _new_image_files(spec: SampleSpec) -> dict[str, bytes]:
    """Unlabelled frames of videos that are not in the labelled sample (for the inference default)."""
    new_seq = np.random.SeedSequence(spec.seed).spawn(3)[2]
    naming_seq, videos_seq = new_seq.spawn(2)
    n_videos = max(1, (spec.n_new_images + 1) // 2)
    videos = _videos(np.random.default_rng(naming_seq), n_videos, 1, offset=7)
    files: dict[str, bytes] = {}
    for info, seq in zip(videos, videos_seq.spawn(n_videos)):
        for i, (gray, _mask, _catheter) in enumerate(render_video(spec, seq, 2)):
            if len(files) < spec.n_new_images:
                files[f"{info.stem(i)}.jpg"] = encode_jpeg(np.repeat(gray[:, :, None], 3, axis=2), 85)
    return files


def generate_sample(output_dir: str | Path, new_images_dir: str | Path | None, spec: SampleSpec) -> dict[str, Any]:
    """Write the synthetic sample (and the unlabelled new images) unless it is already there.

    Only writes into an empty/missing folder or one holding our marker; if the marker's parameters equal
    ``spec`` and every listed file exists, it returns at once.

    Returns:
        A summary: folders, per-folder action (``generated``, ``regenerated``, ``up_to_date``), counts,
        seconds taken and the parameters.

    Raises:
        ForeignDataError: a folder holds data this generator did not write (nothing is written then).
    """
    started = time.perf_counter()
    params = {"generator_version": GENERATOR_VERSION, **spec.to_dict()}
    targets: list[tuple[Path, Any]] = [(Path(output_dir), _labelled_files)]
    if new_images_dir is not None:
        targets.append((Path(new_images_dir), _new_image_files))
    plans = [(folder, make, plan_folder(folder, params)) for folder, make in targets]  # check all first
    summary: dict[str, Any] = {"params": params, "folders": {}}
    for folder, make, plan in plans:
        if plan == "up_to_date":
            n = len((_marker(folder) or {}).get("files", []))
            summary["folders"][folder.as_posix()] = {"action": "up_to_date", "files": n}
            log.info("Synthetic sample in %s is up to date (%d files); not regenerated.", folder, n)
            continue
        if plan == "regenerate":
            _clear_ours(folder)
        files = make(spec)
        _write_folder(folder, params, files)
        action = "regenerated" if plan == "regenerate" else "generated"
        summary["folders"][folder.as_posix()] = {"action": action, "files": len(files)}
        log.info("Synthetic sample: %s %d files in %s.", action, len(files), folder)
    summary["seconds"] = round(time.perf_counter() - started, 3)
    return summary


def spec_from_params(params: dict[str, Any]) -> SampleSpec:
    """The :class:`SampleSpec` of ``params:sample_data`` (keys that are not spec fields are ignored)."""
    fields_ = set(SampleSpec.__dataclass_fields__)
    return SampleSpec(**{k: v for k, v in params.items() if k in fields_})


def generate_from_params(params: dict[str, Any]) -> dict[str, Any]:
    """Generate (or keep) the sample that ``params:sample_data`` describes; a summary with ``status``.

    A folder holding data we did not generate is left alone: the summary says so
    (``skipped_foreign_data``) and nothing is raised, as the folder may well hold the user's data.
    """
    spec = spec_from_params(params)
    try:
        summary = generate_sample(params["output_dir"], params.get("new_images_dir"), spec)
        summary["status"] = "ready"
    except ForeignDataError as exc:
        log.warning("sample_data: %s", exc)
        summary = {"status": "skipped_foreign_data", "reason": str(exc), "params": spec.to_dict()}
    return summary


def generate_if_sample_folder(raw_dir: str | Path, params: dict[str, Any]) -> dict[str, Any] | None:
    """Generate the sample when ``raw_dir`` is its folder (``params["output_dir"]``), else do nothing.

    This is what lets ingestion run alone on a fresh clone with the default ``raw_dir``, and never touch
    anything when ``raw_dir`` is the user's folder. Returns the summary, or None when not the sample folder.
    """
    output_dir = params.get("output_dir")
    if not output_dir or Path(raw_dir).absolute().resolve() != Path(output_dir).absolute().resolve():
        return None
    return generate_from_params(params)
