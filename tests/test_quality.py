"""The data-quality sample: spread over the whole dataset, bounded, read by row groups."""

import pyarrow as pa
import pyarrow.parquet as pq

from refed_ray.data import quality
from refed_ray.storage import Storage


def _dataset(root, files: int, rows: int, rows_per_group: int) -> list[str]:
    """Dataset files whose instructions name their file and row: f<file>-r<row>."""
    (root / "dataset").mkdir(exist_ok=True)
    names = []
    for f in range(files):
        ids = [f"f{f}-r{r}" for r in range(rows)]
        names.append(f"dataset/train-{f:05d}.parquet")
        pq.write_table(pa.table({"instruction": ids, "response": ids, "improved_response": ids}),
                       root / names[-1], row_group_size=rows_per_group)
    return names


def test_sample_is_bounded_and_spread_over_files_and_row_groups(tmp_path, monkeypatch):
    monkeypatch.setattr(quality, "SAMPLE_ROWS", 40)
    monkeypatch.setattr(quality, "SAMPLE_GROUPS", 4)
    files = _dataset(tmp_path, files=7, rows=1000, rows_per_group=100)
    picked = [r["instruction"] for r in quality._sample(Storage(str(tmp_path)), files)]
    assert len(picked) == len(set(picked)) == 40
    # 4 row groups: the first group of files 0, 2, 4 and 6 (one each), 10 spaced rows of each
    assert sorted({p.split("-")[0] for p in picked}) == ["f0", "f2", "f4", "f6"]
    assert [p for p in picked if p.startswith("f4-")] == [f"f4-r{r}" for r in (0, 11, 22, 33, 44, 55, 66, 77, 88, 99)]


def test_one_large_file_is_read_by_a_few_row_groups(tmp_path, monkeypatch):
    monkeypatch.setattr(quality, "SAMPLE_ROWS", 30)
    monkeypatch.setattr(quality, "SAMPLE_GROUPS", 3)
    files = _dataset(tmp_path, files=1, rows=100_000, rows_per_group=1000)
    picked = [r["instruction"] for r in quality._sample(Storage(str(tmp_path)), files)]
    groups = sorted({int(p.split("-r")[1]) // 1000 for p in picked})
    assert len(picked) == 30 and groups == [0, 50, 99]  # first, middle and last of 100 groups


def test_small_dataset_is_taken_whole(tmp_path):
    files = _dataset(tmp_path, files=3, rows=5, rows_per_group=2)
    rows = quality._sample(Storage(str(tmp_path)), files)
    assert sorted(r["instruction"] for r in rows) == sorted(f"f{f}-r{r}" for f in range(3) for r in range(5))
    assert quality._sample(Storage(str(tmp_path)), []) == []
