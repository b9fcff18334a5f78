"""Measured attention dispatch table (written by bench/bench_attention_dispatch.py; do not edit by hand).

DEVICES: per device key, one entry per measured problem: fastest forward + backward round (ms) of
each candidate and the fastest one (``best``). MEASURED: where and how each device's entries were taken.
"""

DEVICES = {
    'cpu-AVX512': [
        {'dtype': 'float32', 'batch_heads': 192, 'seq': 10, 'causal': True, 'masked': False, 'batch': 24, 'heads': 8, 'ms': {'sdpa': 1.019, 'math': 3.215, 'explicit': 3.058}, 'best': 'sdpa'},
        {'dtype': 'float32', 'batch_heads': 192, 'seq': 20, 'causal': True, 'masked': False, 'batch': 24, 'heads': 8, 'ms': {'sdpa': 1.86, 'math': 3.952, 'explicit': 3.754}, 'best': 'sdpa'},
        {'dtype': 'float32', 'batch_heads': 192, 'seq': 77, 'causal': True, 'masked': False, 'batch': 24, 'heads': 8, 'ms': {'sdpa': 14.119, 'math': 18.578, 'explicit': 17.826}, 'best': 'sdpa'},
        {'dtype': 'float32', 'batch_heads': 800, 'seq': 10, 'causal': True, 'masked': False, 'batch': 100, 'heads': 8, 'ms': {'sdpa': 4.797, 'math': 13.316, 'explicit': 12.476}, 'best': 'sdpa'},
        {'dtype': 'float32', 'batch_heads': 800, 'seq': 20, 'causal': True, 'masked': False, 'batch': 100, 'heads': 8, 'ms': {'sdpa': 9.864, 'math': 19.727, 'explicit': 20.507}, 'best': 'sdpa'},
        {'dtype': 'float32', 'batch_heads': 800, 'seq': 77, 'causal': True, 'masked': False, 'batch': 100, 'heads': 8, 'ms': {'sdpa': 91.645, 'math': 153.051, 'explicit': 120.02}, 'best': 'sdpa'},
        {'dtype': 'float32', 'batch_heads': 4000, 'seq': 10, 'causal': True, 'masked': False, 'batch': 500, 'heads': 8, 'ms': {'sdpa': 40.514, 'math': 84.975, 'explicit': 87.223}, 'best': 'sdpa'},
        {'dtype': 'float32', 'batch_heads': 4000, 'seq': 20, 'causal': True, 'masked': False, 'batch': 500, 'heads': 8, 'ms': {'sdpa': 89.755, 'math': 158.839, 'explicit': 136.644}, 'best': 'sdpa'},
        {'dtype': 'float32', 'batch_heads': 48, 'seq': 201, 'causal': False, 'masked': False, 'batch': 4, 'heads': 12, 'ms': {'sdpa': 25.809, 'math': 30.332, 'explicit': 27.647}, 'best': 'sdpa'},
        {'dtype': 'float32', 'batch_heads': 384, 'seq': 201, 'causal': False, 'masked': False, 'batch': 32, 'heads': 12, 'ms': {'sdpa': 154.154, 'math': 272.22, 'explicit': 285.332}, 'best': 'sdpa'},
        {'dtype': 'float32', 'batch_heads': 48, 'seq': 100, 'causal': False, 'masked': True, 'batch': 4, 'heads': 12, 'ms': {'sdpa': 5.041, 'math': 6.677, 'explicit': 5.824}, 'best': 'sdpa'},
        {'dtype': 'float32', 'batch_heads': 384, 'seq': 100, 'causal': False, 'masked': True, 'batch': 32, 'heads': 12, 'ms': {'sdpa': 43.429, 'math': 68.278, 'explicit': 61.28}, 'best': 'sdpa'},
        {'dtype': 'bfloat16', 'batch_heads': 192, 'seq': 10, 'causal': True, 'masked': False, 'batch': 24, 'heads': 8, 'ms': {'sdpa': 9.581, 'math': 2.775, 'explicit': 1.917, 'sdpa_fp32': 1.897}, 'best': 'sdpa_fp32'},
        {'dtype': 'bfloat16', 'batch_heads': 192, 'seq': 20, 'causal': True, 'masked': False, 'batch': 24, 'heads': 8, 'ms': {'sdpa': 7.902, 'math': 2.611, 'explicit': 1.886, 'sdpa_fp32': 2.093}, 'best': 'explicit'},
        {'dtype': 'bfloat16', 'batch_heads': 192, 'seq': 77, 'causal': True, 'masked': False, 'batch': 24, 'heads': 8, 'ms': {'sdpa': 46.531, 'math': 21.878, 'explicit': 10.776, 'sdpa_fp32': 19.782}, 'best': 'explicit'},
        {'dtype': 'bfloat16', 'batch_heads': 800, 'seq': 10, 'causal': True, 'masked': False, 'batch': 100, 'heads': 8, 'ms': {'sdpa': 37.524, 'math': 7.017, 'explicit': 3.926, 'sdpa_fp32': 7.238}, 'best': 'explicit'},
        {'dtype': 'bfloat16', 'batch_heads': 800, 'seq': 20, 'causal': True, 'masked': False, 'batch': 100, 'heads': 8, 'ms': {'sdpa': 32.599, 'math': 18.954, 'explicit': 8.525, 'sdpa_fp32': 15.266}, 'best': 'explicit'},
        {'dtype': 'bfloat16', 'batch_heads': 800, 'seq': 77, 'causal': True, 'masked': False, 'batch': 100, 'heads': 8, 'ms': {'sdpa': 188.533, 'math': 93.46, 'explicit': 47.748, 'sdpa_fp32': 77.163}, 'best': 'explicit'},
        {'dtype': 'bfloat16', 'batch_heads': 4000, 'seq': 10, 'causal': True, 'masked': False, 'batch': 500, 'heads': 8, 'ms': {'sdpa': 205.314, 'math': 46.241, 'explicit': 24.932, 'sdpa_fp32': 48.235}, 'best': 'explicit'},
        {'dtype': 'bfloat16', 'batch_heads': 4000, 'seq': 20, 'causal': True, 'masked': False, 'batch': 500, 'heads': 8, 'ms': {'sdpa': 164.332, 'math': 83.989, 'explicit': 32.261, 'sdpa_fp32': 66.461}, 'best': 'explicit'},
        {'dtype': 'bfloat16', 'batch_heads': 48, 'seq': 201, 'causal': False, 'masked': False, 'batch': 4, 'heads': 12, 'ms': {'sdpa': 26.657, 'math': 28.031, 'explicit': 14.996, 'sdpa_fp32': 21.245}, 'best': 'explicit'},
        {'dtype': 'bfloat16', 'batch_heads': 384, 'seq': 201, 'causal': False, 'masked': False, 'batch': 32, 'heads': 12, 'ms': {'sdpa': 169.349, 'math': 217.477, 'explicit': 170.609, 'sdpa_fp32': 138.498}, 'best': 'sdpa_fp32'},
        {'dtype': 'bfloat16', 'batch_heads': 48, 'seq': 100, 'causal': False, 'masked': True, 'batch': 4, 'heads': 12, 'ms': {'sdpa': 17.555, 'math': 10.89, 'explicit': 6.737, 'sdpa_fp32': 9.428}, 'best': 'explicit'},
        {'dtype': 'bfloat16', 'batch_heads': 384, 'seq': 100, 'causal': False, 'masked': True, 'batch': 32, 'heads': 12, 'ms': {'sdpa': 88.177, 'math': 69.463, 'explicit': 33.485, 'sdpa_fp32': 49.5}, 'best': 'explicit'},
    ],
}

MEASURED = {'cpu-AVX512': {'cpu': 'AMD EPYC, avx512_bf16',
                'torch': '2.14.1+cu130',
                'threads': 2,
                'rounds': 5,
                'loadavg': 1.2,
                'date': '2026-12-06 22:34 UTC'}}
