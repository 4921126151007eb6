def embedding(xp, table, ids):
    return xp.take(table, ids, axis=0)


def linear(x, weight_t, bias=None):
    """x @ W^T, with W^T prepared once at load time (see `prepare_linear`)."""
    y = x @ weight_t
    return y if bias is None else y + bias


def prepare_linear(xp, weight):
    """A Hugging Face [out, in] weight, laid out as [in, out] for `x @ w`."""
    return xp.matrix_transpose(weight)
