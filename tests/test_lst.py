"""packer.lst: face2rec2 .lst lines written and parsed as InsightFace does; clear errors with file:line."""

from __future__ import annotations

import pytest

from packer.errors import UserError
from packer.lst import LstEntry, format_lst_line, read_lst


def _write(tmp_path, text: str, name: str = "train.lst"):
    p = tmp_path / name
    p.write_bytes(text.encode())
    return p


def _face2rec2_parse(line: str):
    """InsightFace's face_preprocess.parse_lst_line (Python 3 spelling), to check our lines against it."""
    vec = line.strip().split("\t")
    assert len(vec) >= 3
    aligned, image_path, label = int(vec[0]), vec[1], int(vec[2])
    bbox = landmark = None
    if len(vec) > 3:
        bbox = [int(vec[i]) for i in range(3, 7)]
        if len(vec) > 7:
            landmark = [float(vec[i]) for i in range(7, 17)]
    return image_path, label, bbox, landmark, aligned


def test_format_plain_line_is_face2rec2_format():
    assert format_lst_line(LstEntry(1, "/data/a/001.jpg", 7)) == "1\t/data/a/001.jpg\t7"


def test_format_box_as_ints_and_landmarks_x_then_y_parse_in_face2rec2():
    lm = (38.2946, 73.5318, 56.0252, 41.5493, 70.7299, 51.6963, 51.5014, 71.7366, 92.3655, 92.2041)
    e = LstEntry(0, "p/x.jpg", 3, bbox=(10, 20.6, 110, 130), landmarks=lm)
    line = format_lst_line(e)
    assert line.split("\t")[3:7] == ["10", "21", "110", "130"]  # face2rec2 int()s these: never "20.6"
    path, label, bbox, landmark, aligned = _face2rec2_parse(line)
    assert (path, label, bbox, aligned) == ("p/x.jpg", 3, [10, 21, 110, 130], 0)
    assert landmark == pytest.approx(lm, abs=0.005)  # %.2f precision
    assert line.split("\t")[7] == "38.29" and "\t40\t" not in line
    # compact floats: no trailing zeros, still float()-parseable
    line = format_lst_line(LstEntry(0, "a", 0, (0, 0, 1, 1), (40.0,) * 5 + (-0.001,) * 5))
    assert line.endswith("\t1\t40\t40\t40\t40\t40\t0\t0\t0\t0\t0")  # "40" not "40.00", "0" not "-0"


def test_format_rejects_what_a_line_cannot_hold():
    with pytest.raises(ValueError, match="tab or newline"):
        format_lst_line(LstEntry(1, "a\tb.jpg", 0))
    with pytest.raises(ValueError, match="need a bbox"):
        format_lst_line(LstEntry(1, "a.jpg", 0, landmarks=(0.0,) * 10))
    with pytest.raises(ValueError, match="10 numbers"):
        format_lst_line(LstEntry(1, "a.jpg", 0, bbox=(0, 0, 1, 1), landmarks=(0.0,) * 4))


def test_read_roundtrip_all_three_shapes(tmp_path):
    entries = [
        LstEntry(1, "/d/a/1.jpg", 0),
        LstEntry(1, "rel/a/2.jpg", 0),
        LstEntry(0, "/d/b/1.jpg", 1, bbox=(1, 2, 30, 40)),
        LstEntry(0, "/d/b/2 with space.jpg", 1, (1, 2, 3, 4), (1.5, 2, 3, 4, 5, 6, 7, 8, 9, 10.25)),
    ]
    p = _write(tmp_path, "".join(format_lst_line(e) + "\n" for e in entries))
    assert list(read_lst(p)) == entries


def test_read_tolerates_bom_blank_lines_crlf_and_float_boxes(tmp_path):
    p = _write(tmp_path, "\ufeff1\t/a/1.jpg\t0\r\n\r\n   \n0\t/a/2.jpg\t0\t1.4\t2\t3.6\t4\n")
    got = list(read_lst(p))
    assert got == [LstEntry(1, "/a/1.jpg", 0), LstEntry(0, "/a/2.jpg", 0, bbox=(1, 2, 4, 4))]


@pytest.mark.parametrize(
    "line, match",
    [
        ("1\t/a.jpg", r"train\.lst:3: expected 3, 7 or 17 tab-separated fields .* got 2"),
        ("1\t/a.jpg\t0\t1\t2", r"train\.lst:3: expected 3, 7 or 17 .* got 5"),
        ("2\t/a.jpg\t0", r"train\.lst:3: first field \(aligned\) must be 0 or 1, got '2'"),
        ("1\t/a.jpg\tbob", r"train\.lst:3: third field \(label\) must be an integer, got 'bob'"),
        ("1\t/a.jpg\t1.0", r"train\.lst:3: third field \(label\) must be an integer"),
        ("1\t\t0", r"train\.lst:3: empty image path"),
        ("1\t/a.jpg\t0\tx\t2\t3\t4", r"train\.lst:3: fields 4-7 \(face box"),
        ("1 /a.jpg 0", r"train\.lst:3: fields must be separated by TABs, not spaces"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path, line, match):
    p = _write(tmp_path, f"1\t/ok/1.jpg\t0\n\n{line}\n1\t/ok/2.jpg\t0\n")
    with pytest.raises(UserError, match=match):
        list(read_lst(p))


def test_im2rec_lst_is_recognised_and_conversion_explained(tmp_path):
    p = _write(tmp_path, "0\t0.000000\talice/1.jpg\n1\t0.000000\talice/2.jpg\n2\t1.000000\tbob/1.jpg\n")
    with pytest.raises(UserError) as ei:
        list(read_lst(p))
    msg = str(ei.value)
    assert msg.startswith(f"{p}:1: this is an mxnet im2rec .lst line")
    assert "aligned<TAB>path<TAB>label" in msg and "awk" in msg and "\n" not in msg
    # multi-label im2rec lines too
    p2 = _write(tmp_path, "0\t1\t2\t3\tbob/1.jpg\n", "multi.lst")
    with pytest.raises(UserError, match="im2rec"):
        list(read_lst(p2))


def test_label_grouping_error_names_the_lines(tmp_path):
    lines = ["1\t/a/1.jpg\t0", "1\t/a/2.jpg\t0", "1\t/b/1.jpg\t1", "1\t/b/2.jpg\t1", "1\t/b/3.jpg\t1", "1\t/a/3.jpg\t0"]
    p = _write(tmp_path, "\n".join(lines) + "\n")
    with pytest.raises(UserError) as ei:
        list(read_lst(p))
    msg = str(ei.value)
    assert msg.startswith(f"{p}:6: label 0 appears again")
    assert "lines 1-2" in msg and "label 1 came in between (lines 3-5)" in msg and "sort" in msg
    # not required: the same file reads fine
    assert len(list(read_lst(p, require_grouped=False))) == 6


def test_non_sorted_but_grouped_labels_are_fine(tmp_path):
    p = _write(tmp_path, "1\t/b/1.jpg\t5\n1\t/a/1.jpg\t3\n1\t/a/2.jpg\t3\n")
    assert [e.label for e in read_lst(p)] == [5, 3, 3]


def test_missing_or_directory_lst_is_one_clear_error(tmp_path):
    with pytest.raises(UserError, match=r"nope\.lst: no such \.lst file"):
        list(read_lst(tmp_path / "nope.lst"))
    with pytest.raises(UserError, match=r"is a directory; make a \.lst of it first: gpu-align lst"):
        list(read_lst(tmp_path))


def test_non_utf8_file_names_round_trip(tmp_path):
    raw = b"1\t/d/\xe9t\xe9.jpg\t0\n"  # latin-1 bytes in a Linux file name
    p = tmp_path / "l.lst"
    p.write_bytes(raw)
    (e,) = list(read_lst(p))
    assert (format_lst_line(e) + "\n").encode("utf-8", "surrogateescape") == raw
