"""Part counting decides what the district is billed; carriers count every character."""

from __future__ import annotations

import pytest

from dispatcher.sms import segment


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
