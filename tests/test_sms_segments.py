"""Part counting decides what the district is billed; carriers count every character."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatcher.sms import GSM7_BASIC, GSM7_EXTENSION, segment, split_parts
from tests.conftest import Project


@pytest.mark.parametrize(
    ("text", "encoding", "parts"),
    [
        ("a" * 160, "GSM-7", 1),
        ("a" * 161, "GSM-7", 2),
        ("a" * 306, "GSM-7", 2),  # 2 x 153
        ("a" * 307, "GSM-7", 3),
        ("{" * 80, "GSM-7", 1),  # extension characters take two septets: 160 units
        ("{" * 81, "GSM-7", 2),
        ("防" * 70, "UCS-2", 1),
        ("防" * 71, "UCS-2", 2),
        ("防" * 134, "UCS-2", 2),  # 2 x 67
        ("防" * 135, "UCS-2", 3),
        ("a" * 69 + "防", "UCS-2", 1),  # one Chinese character turns the whole message into UCS-2
        ("a" * 70 + "防", "UCS-2", 2),
    ],
)
def test_encoding_and_parts_follow_gsm7_and_ucs2_limits(text: str, encoding: str, parts: int) -> None:
    result = segment(text)
    assert (result.encoding, result.parts) == (encoding, parts)


def test_signature_and_opt_out_count_towards_parts() -> None:
    body = "防" * 60
    assert segment(body).parts == 1
    assert segment("【常州经开区反诈中心】" + body + "回T退订").parts == 2


def test_characters_outside_the_bmp_take_two_ucs2_units() -> None:
    assert segment("😀" * 35).units == 70
    assert segment("😀" * 36).parts == 2


# ------------------------------------------------------------------ parts as handsets and providers split them

GSM_ESCAPES = "€[]{}~|^\\\f"
UCS2_LIMITS = {"GSM-7": (160, 153), "UCS-2": (70, 67)}


def test_67_emoji_are_three_parts_because_a_surrogate_pair_is_never_split() -> None:
    text = "😀" * 67  # 134 UTF-16 units: 67 per part would cut the 34th emoji in half
    parts = split_parts(text)
    assert [len(p) for p in parts] == [33, 33, 1]
    assert segment(text).parts == 3


def test_an_escape_pair_that_would_straddle_a_boundary_moves_to_the_next_part() -> None:
    text = "a" * 152 + "€" + "a" * 10  # the euro sign would take septets 153 and 154
    parts = split_parts(text)
    assert parts[0] == "a" * 152
    assert parts[1].startswith("€")
    assert segment(text).parts == 2


def test_escapes_filling_whole_parts_split_between_pairs() -> None:
    parts = split_parts("{" * 100)  # 200 septets: 76 pairs (152) per part, never 76.5
    assert [len(p) for p in parts] == [76, 24]


def _units(text: str, encoding: str) -> int:
    if encoding == "GSM-7":
        return sum(2 if c in GSM_ESCAPES else 1 for c in text)
    return len(text.encode("utf-16-le")) // 2


gsm_text = st.text(alphabet=st.sampled_from(sorted(GSM7_BASIC | GSM7_EXTENSION)), max_size=500)
ucs2_text = st.text(
    alphabet=st.one_of(
        st.sampled_from("防诈骗回T退订【】a{€ "),
        st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF),  # emoji: surrogate pairs
        st.characters(min_codepoint=0x20000, max_codepoint=0x2A6DF),  # rare CJK outside the BMP
    ),
    min_size=1,
    max_size=300,
).filter(lambda t: any(c not in GSM7_BASIC and c not in GSM7_EXTENSION for c in t))


#: long texts dense in pairs: where a pair straddles a boundary and naive arithmetic undercounts
dense_pairs = st.one_of(
    st.text(alphabet=st.sampled_from("a{€"), min_size=80, max_size=400),
    st.text(alphabet=st.sampled_from("防😀𠀀"), min_size=35, max_size=250),
    # a few BMP characters, then pairs: totals land just under a multiple of 67 units
    st.builds(
        lambda pre, n, tail: "防" * pre + "😀" * n + tail, st.integers(0, 3), st.integers(30, 140), st.text("a防")
    ),
)


@settings(max_examples=300, deadline=None, database=None)
@given(st.one_of(gsm_text, ucs2_text, dense_pairs, st.text(max_size=400)))
def test_parts_rejoin_fit_their_limits_and_agree_with_the_count(text: str) -> None:
    seg = segment(text)
    parts = split_parts(text)
    assert "".join(parts) == text
    assert seg.parts == len(parts)
    single, multi = UCS2_LIMITS[seg.encoding]
    if seg.units <= single:
        assert parts == [text]
    else:
        assert all(0 < _units(p, seg.encoding) <= multi for p in parts)
        # greedy like a handset: a part ends early only when the next character is a pair that does not fit
        for part, following in itertools.pairwise(parts):
            assert _units(part, seg.encoding) + _units(following[0], seg.encoding) > multi


@settings(max_examples=200, deadline=None, database=None)
@given(st.one_of(gsm_text, ucs2_text, dense_pairs))
def test_no_escape_sequence_or_surrogate_pair_is_split(text: str) -> None:
    encoding = segment(text).encoding
    parts = split_parts(text)
    for part in parts:
        # each part is valid UTF-16 on its own: no half of a surrogate pair at either end
        assert part.encode("utf-16-le").decode("utf-16-le") == part
    # the units on the wire add up: no escape septet or surrogate half was cut off or carried twice
    assert sum(_units(p, encoding) for p in parts) == _units(text, encoding)


PREVIEW_CAMPAIGN = """\
id: emoji-drill
title: 演练
owner: 公安分局
template: emoji.sms.j2
variables:
  hotline: "96110"
audience:
  districts: [横林镇]
"""


def test_preview_shows_where_each_part_ends(project: Project) -> None:
    # 134 UTF-16 units, 2 x 67 by plain arithmetic; but two emoji would straddle a boundary, so 3 parts
    project.write("templates/emoji.sms.j2", "拨{{ hotline }}您" + "😀" * 56)
    path = project.write("campaigns/emoji.yaml", PREVIEW_CAMPAIGN)
    as_json = project.dispatch("preview", str(path), "--json")
    assert as_json.returncode == 0, as_json.stderr
    variant = json.loads(as_json.stdout)["variants"][0]
    assert variant["parts"] == 3
    assert "".join(variant["part_texts"]) == variant["text"]
    assert [len(p.encode("utf-16-le")) // 2 for p in variant["part_texts"]] == [66, 67, 1]

    text = project.dispatch("preview", str(path))
    assert text.returncode == 0, text.stderr
    lines = [line for line in text.stdout.splitlines() if line.startswith("[")]
    assert [line.split(",")[0] for line in lines] == ["[1/3", "[2/3", "[3/3"]
    assert lines[0].endswith(variant["part_texts"][0]) and lines[2].endswith(variant["part_texts"][2])


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(max_size=200),
    key=st.text(max_size=60),
    parts=st.integers(min_value=0, max_value=20),
)
def test_an_outbox_line_is_the_json_of_its_message_whatever_the_text(text: str, key: str, parts: int) -> None:
    from dispatcher.providers.base import OutgoingMessage
    from dispatcher.providers.outbox.gateway import OutboxGateway, encode_json

    message = OutgoingMessage(
        key=key, run_id="run-1", campaign_id="c", to="+8613800000000", body=text, parts=parts, encoding="ucs2"
    )
    line = OutboxGateway._line(OutboxGateway.__new__(OutboxGateway), message, "2026-11-30T10:00:00+08:00")
    record = {
        "key": key, "run_id": "run-1", "campaign_id": "c", "to": "+8613800000000", "body": text,
        "parts": parts, "encoding": "ucs2", "at": "2026-11-30T10:00:00+08:00",
    }  # fmt: skip
    # one line, byte for byte what the JSON encoder writes, and it reads back as the message
    assert line == (encode_json(record) + "\n").encode()
    assert line.count(b"\n") == 1 and json.loads(line) == record
