"""Where a query's geometric verification time goes (issue 23 item 5; docs/quality.md).

    PYTHONPATH=. .venv/bin/python tests/bench/profile_verify.py /tmp/bench_verify/tune/search [TOP]

Reads a search output made without verification (e.g. bench_verify.py's ``<work>/<split>/search``) and
replays the pre-gate rule of ``search.geometric`` (ORB 1000, ratio 0.8, RANSAC homography, every row of
the first TOP ranks, whole query + mirror + the row's query region + its mirror, each image described
once) with a timer around each step: reading the bytes, decoding, grey/crop/resize, ORB detection,
knnMatch, RANSAC. Prints each step's calls, ms per call, ms per query and share of the total.
"""
import collections
import sys
import time

import cv2
import numpy as np
from PIL import Image
from retrieval import fsio
from retrieval.extract.preprocess import decode_image
from retrieval.search import read_results
from retrieval.search.geometric import Geometric, _box
results = sys.argv[1]
TOP = int(sys.argv[2]) if len(sys.argv) > 2 else 10
t = read_results(results)
g = Geometric(top=10)
T = collections.defaultdict(float); N = collections.Counter()
def tm(key, f, *a, **kw):
    t0 = time.perf_counter(); r = f(*a, **kw); T[key] += time.perf_counter() - t0; N[key] += 1; return r
orb = cv2.ORB_create(nfeatures=g.features); bf = cv2.BFMatcher(cv2.NORM_HAMMING)
def load(url, box, who):
    data = tm(f'{who} read', fsio.read_bytes, url)
    img, _, _ = tm(f'{who} decode', decode_image, data, draft_size=None if box else g.max_side)
    def prep(img):
        img = img.convert('L')
        if box is not None:
            w, h = img.size
            img = img.crop((round(box[0]*w), round(box[1]*h), max(round(box[2]*w),1), max(round(box[3]*h),1)))
        if max(img.size) > g.max_side:
            s = g.max_side / max(img.size)
            img = img.resize((max(1, round(img.width*s)), max(1, round(img.height*s))), Image.BILINEAR)
        return np.asarray(img, np.uint8)
    return tm(f'{who} grey/crop/resize', prep, img)
def describe(gray, who):
    kp, d = tm(f'{who} ORB detect', orb.detectAndCompute, gray, None)
    return np.array([k.pt for k in kp], np.float32).reshape(-1, 2), d
def count(a, b, who):
    (xa, da), (xb, db) = a, b
    if da is None or db is None or len(da) < 2 or len(db) < 2: return 0
    pairs = tm(f'{who} knnMatch', bf.knnMatch, da, db, k=2)
    good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < g.ratio*p[1].distance]
    if len(good) < 4: return 0
    src = xa[[m.queryIdx for m in good]].reshape(-1,1,2); dst = xb[[m.trainIdx for m in good]].reshape(-1,1,2)
    _, mask = tm(f'{who} RANSAC', cv2.findHomography, src, dst, cv2.RANSAC, g.reproj)
    return int(mask.sum()) if mask is not None else 0
qu, gu = t.column('query_uri').to_pylist(), t.column('gallery_uri').to_pylist()
qr, ranks, qid = t.column('query_region').to_pylist(), t.column('rank').to_numpy(), t.column('query_id').to_pylist()
cache = {}; gcache = {}
t0 = time.perf_counter()
for i in np.flatnonzero(ranks <= TOP):
    if gu[i] not in gcache:
        gcache[gu[i]] = describe(load(gu[i], None, 'gallery'), 'gallery')
    gf = gcache[gu[i]]
    if (qu[i], None) not in cache:
        gray = load(qu[i], None, 'query')
        cache[(qu[i], None)] = (describe(gray, 'query'), describe(np.ascontiguousarray(gray[:, ::-1]), 'query mirror'))
    qf, qm = cache[(qu[i], None)]
    count(qf, gf, 'plain'); count(qm, gf, 'mirror')
    b = _box(qr[i])
    if b:
        if (qu[i], qr[i]) not in cache:
            gray = load(qu[i], b, 'region')
            cache[(qu[i], qr[i])] = (describe(gray, 'region'), describe(np.ascontiguousarray(gray[:, ::-1]), 'region mirror'))
        rf, rm = cache[(qu[i], qr[i])]
        count(rf, gf, 'region'); count(rm, gf, 'region mirror')
total = time.perf_counter() - t0
nq = len(set(qid)); rows = int((ranks <= TOP).sum())
print(f'{results}: {nq} queries, {rows} rows (ranks<=TOP), {len(gcache)} gallery images, {len(cache)} query images/regions; total {total:.1f}s = {1000*total/nq:.1f} ms/query')
print(f'{"component":34s} {"calls":>6s} {"ms/call":>8s} {"ms/query":>9s} {"share":>6s}')
for k, v in sorted(T.items(), key=lambda kv: -kv[1]):
    print(f'{k:34s} {N[k]:6d} {1000*v/N[k]:8.2f} {1000*v/nq:9.2f} {100*v/total:5.1f}%')
print(f'{"other (python, ratio test, ...)":34s} {"":6s} {"":8s} {1000*(total-sum(T.values()))/nq:9.2f} {100*(total-sum(T.values()))/total:5.1f}%')
