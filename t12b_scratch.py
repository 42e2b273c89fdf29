import faiss, numpy as np, os, sys, psutil
fl=int(sys.argv[1])
def rss(): 
    d=open("/proc/self/smaps_rollup").read(); return {l.split(':')[0]:int(l.split()[1])//1024 for l in d.splitlines()[1:] if l.split(':')[0] in ("Rss","Pss","Private_Clean","Private_Dirty","Shared_Clean")}
a=rss(); x=faiss.read_index("/tmp/t12.faiss",fl); q=np.random.default_rng(1).standard_normal((100,256)).astype('float32'); x.search(q,10); b=rss()
print(fl, {k:b[k]-a[k] for k in a}, type(faiss.downcast_InvertedLists(faiss.extract_index_ivf(x).invlists)).__name__)
