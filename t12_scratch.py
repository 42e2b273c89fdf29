import faiss, numpy as np, os, time, psutil, sys
from marketplace_search.search import build_index
rng=np.random.default_rng(0)
n=200000
v=rng.standard_normal((n,256)).astype('float32'); v/=np.linalg.norm(v,axis=1,keepdims=True)
t=time.time(); idx,p=build_index(v,"ivfpq"); print(p, time.time()-t)
faiss.write_index(idx,"/tmp/t12.faiss"); print(os.path.getsize("/tmp/t12.faiss")/1e6,"MB")
