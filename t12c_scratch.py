import faiss, numpy as np, time, sys
faiss.omp_set_num_threads(int(sys.argv[1]))
rng=np.random.default_rng(0)
n=200000
v=rng.standard_normal((n,256)).astype('float32'); v/=np.linalg.norm(v,axis=1,keepdims=True)
base=faiss.index_factory(256,"IVF512,PQ32x8",faiss.METRIC_INNER_PRODUCT)
idx=faiss.IndexRefine(base, faiss.IndexScalarQuantizer(256,faiss.ScalarQuantizer.QT_8bit,faiss.METRIC_INNER_PRODUCT))
t=time.time(); idx.train(v[:32768]); print("train",time.time()-t)
t=time.time(); idx.add(v[:50000]); print("add50k",time.time()-t)
