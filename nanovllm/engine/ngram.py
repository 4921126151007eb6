"""N-gram prompt lookup: proposals for speculative decoding taken from a sequence's own tokens.

The last n tokens of a sequence (its prompt and output so far), for n from `n_max` down to
`n_min`, are looked for earlier in the same tokens; the tokens that followed the latest
earlier occurrence are proposed. Text that quotes its input (code edits, extraction, answers
grounded in a passage) repeats long runs of it, and there the proposals are often right.

Pure Python: the tokens are packed as 4-byte words once per call and searched with
`bytes.rfind` (a C loop), so a call costs microseconds for a few thousand tokens.
"""

from __future__ import annotations

from array import array


def propose(token_ids: list[int], k: int, n_min: int, n_max: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the longest suffix of
    token_ids (n_max >= length >= n_min) found earlier in it; [] when none is found."""
    total = len(token_ids)
    if k <= 0 or total < n_min + 1:
        return []
    packed = array("i", token_ids).tobytes()
    for n in range(min(n_max, total - 1), n_min - 1, -1):
        suffix = packed[(total - n) * 4 :]
        # an occurrence must end before the last token, so that at least one token follows
        end = (total - 1) * 4
        while True:
            at = packed.rfind(suffix, 0, end)
            if at < 0:
                break
            if at % 4 == 0:  # a match on token boundaries, not across them
                start = at // 4 + n
                return token_ids[start : start + k]
            end = at + len(suffix) - 1  # look further left
    return []
