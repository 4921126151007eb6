def rms_norm(xp, x, weight, eps: float):
    var = xp.mean(x * x, axis=-1, keepdims=True)
    return x * (1.0 / xp.sqrt(var + eps)) * weight


def layer_norm(xp, x, weight, bias, eps: float):
    mean = xp.mean(x, axis=-1, keepdims=True)
    centered = x - mean
    var = xp.mean(centered * centered, axis=-1, keepdims=True)
    out = centered * (1.0 / xp.sqrt(var + eps)) * weight
    return out if bias is None else out + bias
