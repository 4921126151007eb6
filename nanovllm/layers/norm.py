def rms_norm(xp, x, weight, eps: float):
    """x [..., n] normalized over its last axis, times weight [n]."""
    var = xp.mean(x * x, axis=-1, keepdims=True)  # [..., 1]
    return x * (1.0 / xp.sqrt(var + eps)) * weight  # [..., n]


def layer_norm(xp, x, weight, bias, eps: float):
    """x [..., n] normalized over its last axis, times weight [n], plus bias [n] if any."""
    mean = xp.mean(x, axis=-1, keepdims=True)  # [..., 1]
    centered = x - mean  # [..., n]
    var = xp.mean(centered * centered, axis=-1, keepdims=True)  # [..., 1]
    out = centered * (1.0 / xp.sqrt(var + eps)) * weight  # [..., n]
    return out if bias is None else out + bias
