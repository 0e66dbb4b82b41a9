"""The strict request-head check that runs before Autobahn's lenient parser."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from twisted_novnc.front.requesthead import MAX_HEAD, BadHead, check_head, head_end

GOOD = b"GET /websockify/x HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n\r\n"


def test_well_formed_head_passes():
    """An ordinary upgrade request passes, with its end found."""
    assert head_end(GOOD + b"\x82\x80") == len(GOOD)
    check_head(GOOD)


@pytest.mark.parametrize(
    "head",
    [
        b"POST / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.0\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost : x\r\n\r\n",
        b"GET / HTTP/1.1\r\nX-A: a\rHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nX-A: a\x0bHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nX-A: a\x85Host: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nX-A: a\r\n Host: x\r\n\r\n",
    ],
    ids=["method", "version", "no-colon", "space-colon", "bare-cr", "vt", "nel", "obs-fold"],
)
def test_smuggling_shapes_are_refused(head):
    """Lines Autobahn would split or misread differently from a front proxy get 400."""
    with pytest.raises(BadHead) as e:
        check_head(head)
    assert e.value.status == 400


def test_oversized_head_is_431():
    """A head that has not ended within MAX_HEAD bytes is refused with 431."""
    assert head_end(b"GET / HTTP/1.1\r\nX: " + b"a" * (MAX_HEAD - 100)) is None
    with pytest.raises(BadHead) as e:
        head_end(b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_HEAD)
    assert e.value.status == 431


@given(st.binary(max_size=2000))
def test_never_raises_anything_else(data):
    """Arbitrary bytes give an end, None, or BadHead; nothing else."""
    try:
        end = head_end(data)
        if end is not None:
            check_head(data[:end])
    except BadHead:
        pass
