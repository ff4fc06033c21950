# Sampler/guidance sweep of an editing model on the first turns of a synthetic set (validation, never the
# test set): edit-region and preservation L1 on [0,1] per setting, through `rl4pix-train edit`.
# usage: python training/scripts/sweep_sampler.py BINARY MODEL DATASET N SCHED,G,IG ...   (STEPS=20 by default)
import json, os, subprocess, sys
import numpy as np
from PIL import Image
binary, model, data, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
cfgs = [c.split(',') for c in sys.argv[5:]]
S = json.load(open(f'{data}/edit_sessions.json'))
turns = [(sid, t) for sid in S for t in S[sid][:1]][:n]
load = lambda p: np.asarray(Image.open(p).convert('RGB')).astype(np.float64) / 255
for sched, g, ig in cfgs:
    er, pr = [], []
    for sid, t in turns:
        out = f'/tmp/sweep_{sid}.png'
        subprocess.run([binary, 'edit', '--model', model, '--image', f'{data}/images/{sid}/{t["input"]}',
                        '--instruction', t['instruction'], '--out', out, '--scheduler', sched,
                        '--guidance-scale', g, '--image-guidance-scale', ig, '--steps', os.environ.get('STEPS','20')],
                       check=True, capture_output=True, env={**os.environ, 'RAYON_NUM_THREADS': '1'})
        gen, gt, src = load(out), load(f'{data}/images/{sid}/{t["output"]}'), load(f'{data}/images/{sid}/{t["input"]}')
        m = np.asarray(Image.open(f'{data}/images/{sid}/{t["mask"]}').convert('L')).astype(np.float64) / 255
        m3 = m[..., None]
        er.append((np.abs(gen - gt) * m3).sum() / (3 * m.sum()))
        pr.append((np.abs(gen - src) * (1 - m3)).sum() / (3 * (1 - m).sum()))
    print(f'{sched} g={g} ig={ig}: edit-region L1 {np.mean(er):.4f}  preservation L1 {np.mean(pr):.4f}', flush=True)
