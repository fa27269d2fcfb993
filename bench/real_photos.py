"""Real photographs that installed packages ship, for tests and benchmarks (never generated).

Two sources: PyPI packages of the dev install (scikit-image's data module, scikit-learn's
sample images, matplotlib's sample photo) and Debian packages (`darknet`'s sample photos,
`opencv-doc`'s example data), which `make real-photos` (or `python bench/real_photos.py`)
fetches with `apt-get download` and unpacks, only the listed files, into .cache/real_photos/;
nothing is installed system-wide. Each photo has the shop category it would be listed under.

    .venv/bin/python bench/real_photos.py          # fetch the Debian photos, list every photo
    .venv/bin/python bench/real_photos.py --folder data/real-photos   # a shop's photo folder
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "real_photos"
OPENCV_DATA = "usr/share/doc/opencv-doc/examples/data"

# name -> (source, package, path inside it, shop category); source "pypi" or "debian"
PHOTOS: dict[str, tuple[str, str, str, str]] = {
    "astronaut.png": ("pypi", "skimage", "data/astronaut.png", "portrait"),
    "grace_hopper.jpg": ("pypi", "matplotlib", "mpl-data/sample_data/grace_hopper.jpg",
                         "portrait"),
    "chelsea.png": ("pypi", "skimage", "data/chelsea.png", "animal"),
    "coffee.png": ("pypi", "skimage", "data/coffee.png", "tableware"),
    "rocket.jpg": ("pypi", "skimage", "data/rocket.jpg", "vehicle"),
    "motorcycle_left.png": ("pypi", "skimage", "data/motorcycle_left.png", "vehicle"),
    "motorcycle_right.png": ("pypi", "skimage", "data/motorcycle_right.png", "vehicle"),
    "china.jpg": ("pypi", "sklearn", "datasets/images/china.jpg", "scenery"),
    "flower.jpg": ("pypi", "sklearn", "datasets/images/flower.jpg", "plant"),
    "retina.jpg": ("pypi", "skimage", "data/retina.jpg", "science"),
    "hubble_deep_field.jpg": ("pypi", "skimage", "data/hubble_deep_field.jpg", "science"),
    "ihc.png": ("pypi", "skimage", "data/ihc.png", "science"),
    "color.png": ("pypi", "skimage", "data/color.png", "science"),
    "brick.png": ("pypi", "skimage", "data/brick.png", "texture"),
    "grass.png": ("pypi", "skimage", "data/grass.png", "texture"),
    "gravel.png": ("pypi", "skimage", "data/gravel.png", "texture"),
    "camera.png": ("pypi", "skimage", "data/camera.png", "portrait"),
    "dog.jpg": ("debian", "darknet", "usr/share/darknet/data/dog.jpg", "animal"),
    "eagle.jpg": ("debian", "darknet", "usr/share/darknet/data/eagle.jpg", "animal"),
    "giraffe.jpg": ("debian", "darknet", "usr/share/darknet/data/giraffe.jpg", "animal"),
    "horses.jpg": ("debian", "darknet", "usr/share/darknet/data/horses.jpg", "animal"),
    "kite.jpg": ("debian", "darknet", "usr/share/darknet/data/kite.jpg", "toy"),
    "person.jpg": ("debian", "darknet", "usr/share/darknet/data/person.jpg", "animal"),
    "aloeL.jpg": ("debian", "opencv-doc", f"{OPENCV_DATA}/aloeL.jpg", "plant"),
    "plant.jpg": ("debian", "opencv-doc",
                  "usr/share/doc/opencv-doc/examples/alphamat/input_images/plant.jpg",
                  "plant"),
    "basketball1.png": ("debian", "opencv-doc", f"{OPENCV_DATA}/basketball1.png", "sports"),
    "messi5.jpg": ("debian", "opencv-doc", f"{OPENCV_DATA}/messi5.jpg", "sports"),
    "chicky_512.png": ("debian", "opencv-doc", f"{OPENCV_DATA}/chicky_512.png", "animal"),
    "ela_original.jpg": ("debian", "opencv-doc", f"{OPENCV_DATA}/ela_original.jpg", "book"),
    "fruits.jpg": ("debian", "opencv-doc", f"{OPENCV_DATA}/fruits.jpg", "food"),
    "apple.jpg": ("debian", "opencv-doc", f"{OPENCV_DATA}/apple.jpg", "food"),
    "orange.jpg": ("debian", "opencv-doc", f"{OPENCV_DATA}/orange.jpg", "food"),
    "squirrel_cls.jpg": ("debian", "opencv-doc", f"{OPENCV_DATA}/squirrel_cls.jpg", "animal"),
    "baboon.jpg": ("debian", "opencv-doc", f"{OPENCV_DATA}/baboon.jpg", "animal"),
    "building.jpg": ("debian", "opencv-doc", f"{OPENCV_DATA}/building.jpg", "scenery"),
    "board.jpg": ("debian", "opencv-doc", f"{OPENCV_DATA}/board.jpg", "science"),
    "home.jpg": ("debian", "opencv-doc", f"{OPENCV_DATA}/home.jpg", "scenery"),
    "stuff.jpg": ("debian", "opencv-doc", f"{OPENCV_DATA}/stuff.jpg", "tableware"),
    "rubberwhale1.png": ("debian", "opencv-doc", f"{OPENCV_DATA}/rubberwhale1.png", "toy"),
    "leuvenA.jpg": ("debian", "opencv-doc", f"{OPENCV_DATA}/leuvenA.jpg", "scenery"),
    "aero1.jpg": ("debian", "opencv-doc", f"{OPENCV_DATA}/aero1.jpg", "scenery"),
    "butterfly.jpg": ("debian", "opencv-doc", f"{OPENCV_DATA}/butterfly.jpg", "animal"),
    "HappyFish.jpg": ("debian", "opencv-doc", f"{OPENCV_DATA}/HappyFish.jpg", "animal"),
    "box_in_scene.png": ("debian", "opencv-doc", f"{OPENCV_DATA}/box_in_scene.png",
                         "tableware"),
    "graf1.png": ("debian", "opencv-doc", f"{OPENCV_DATA}/graf1.png", "scenery"),
    "pic2.png": ("debian", "opencv-doc", f"{OPENCV_DATA}/pic2.png", "scenery"),
    # near-duplicates of the above (the other stereo view, the next frame, an edit): a query
    # must find its own listing, not its twin
    "aloeR.jpg": ("debian", "opencv-doc", f"{OPENCV_DATA}/aloeR.jpg", "plant"),
    "basketball2.png": ("debian", "opencv-doc", f"{OPENCV_DATA}/basketball2.png", "sports"),
    "leuvenB.jpg": ("debian", "opencv-doc", f"{OPENCV_DATA}/leuvenB.jpg", "scenery"),
    "graf3.png": ("debian", "opencv-doc", f"{OPENCV_DATA}/graf3.png", "scenery"),
    "aero3.jpg": ("debian", "opencv-doc", f"{OPENCV_DATA}/aero3.jpg", "scenery"),
    "ela_modified.jpg": ("debian", "opencv-doc", f"{OPENCV_DATA}/ela_modified.jpg", "book"),
    "box.png": ("debian", "opencv-doc", f"{OPENCV_DATA}/box.png", "tableware"),
    **{f"left0{i}.jpg": ("debian", "opencv-doc", f"{OPENCV_DATA}/left0{i}.jpg", "game")
       for i in range(1, 10)},
}
# the issue-16 real-data shop (bench/real_data.py): the PyPI photos it was measured on
REAL_DATA_PHOTOS = tuple(n for n, v in PHOTOS.items() if v[0] == "pypi" and n != "camera.png")


def _debian_path(package: str, rel: str) -> Path:
    return CACHE / package / rel


def fetch_debian(names: list[str] | None = None) -> list[Path]:
    """Download and unpack the listed photos of each Debian package once (cached)."""
    wanted: dict[str, list[str]] = {}
    for name in names or list(PHOTOS):
        source, package, rel, _ = PHOTOS[name]
        if source == "debian" and not _debian_path(package, rel).is_file():
            wanted.setdefault(package, []).append(rel)
    for package, rels in wanted.items():
        if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
            raise FileNotFoundError(f"the {package} photos need Debian's apt-get and dpkg-deb "
                                    "to fetch; run on Debian/Ubuntu or copy them into "
                                    f"{CACHE / package}")
        with tempfile.TemporaryDirectory() as tmp:
            got = subprocess.run(["apt-get", "download", package], cwd=tmp,
                                 capture_output=True, text=True)
            debs = list(Path(tmp).glob(f"{package}_*.deb"))
            if got.returncode != 0 or not debs:
                raise FileNotFoundError(f"apt-get download {package} failed: "
                                        f"{got.stderr.strip()[-400:]}")
            unpack = Path(tmp) / "x"
            unpack.mkdir()
            tar = subprocess.run(
                f"dpkg-deb --fsys-tarfile '{debs[0]}' | tar -x -C '{unpack}' "
                + " ".join(f"'./{r}'" for r in rels), shell=True, capture_output=True,
                text=True)
            if tar.returncode != 0:
                raise FileNotFoundError(f"unpacking {debs[0].name}: {tar.stderr[-400:]}")
            for rel in rels:
                dst = _debian_path(package, rel)
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(unpack / rel, dst)
    return [_debian_path(PHOTOS[n][1], PHOTOS[n][2]) for n in names or list(PHOTOS)
            if PHOTOS[n][0] == "debian"]


def photo_path(name: str) -> Path:
    source, package, rel, _ = PHOTOS[name]
    if source == "pypi":
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise FileNotFoundError(f"{name} comes from the PyPI package {package}: "
                                    "install the dev extra (`make venv`)")
        path = Path(spec.origin).parent / rel
    else:
        path = _debian_path(package, rel)
        if not path.is_file():
            fetch_debian([name])
    if not path.is_file():
        raise FileNotFoundError(f"{package} no longer ships {rel}")
    return path


def real_photos(names: list[str] | tuple[str, ...] | None = None
                ) -> dict[str, tuple[Path, str]]:
    """name -> (file, shop category) of the named photos (default: all)."""
    return {n: (photo_path(n), PHOTOS[n][3]) for n in (names or list(PHOTOS))}


def write_folder(out: Path) -> Path:
    """Every photo copied into `out/<category>/<name>`: the folder a shop would hand
    `loupe demo --catalog` (sub-folders are categories)."""
    for name, (path, category) in real_photos().items():
        (Path(out) / category).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(out) / category / name)
    return Path(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--folder", type=Path, default=None,
                    help="also copy every photo into FOLDER/<category>/")
    args = ap.parse_args()
    fetch_debian()
    for name, (path, category) in real_photos().items():
        print(f"{name:24s} {category:10s} {path}")
    if args.folder:
        print(f"{len(PHOTOS)} real photos -> {write_folder(args.folder)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
