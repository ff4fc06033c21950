# Edit-region L1 per edit kind (model vs identity) on the first turns of a synthetic set, from an
# `eval --out GEN` folder (MagicBrush's generated layout).
# usage: python training/scripts/per_kind.py GEN DATASET N_SESSIONS
import json, sys, numpy as np
from PIL import Image
from collections import defaultdict
gen, D, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
S=json.load(open(f'{D}/edit_sessions.json'))
load=lambda p: np.asarray(Image.open(p).convert('RGB')).astype(np.float64)/255
res=defaultdict(list)
for sid in sorted(S)[:n]:
    t=S[sid][0]
    out=load(f'{gen}/{sid}/{sid}_1.png'); tgt=load(f'{D}/images/{sid}/{t["output"]}'); src=load(f'{D}/images/{sid}/{t["input"]}')
    m=np.asarray(Image.open(f'{D}/images/{sid}/{t["mask"]}').convert('L'))>127
    if not m.any(): continue
    res[t['edit_kind']].append((np.abs(out-tgt)[m].mean(), np.abs(src-tgt)[m].mean(), m.mean()))
for k,v in sorted(res.items()):
    v=np.array(v); print(f'{k:15s} n={len(v):3d} model {v[:,0].mean():.4f} identity {v[:,1].mean():.4f} ratio {v[:,0].mean()/v[:,1].mean():.2f} mask-frac {v[:,2].mean():.3f}')
