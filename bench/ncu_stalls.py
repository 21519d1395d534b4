import csv,sys,collections
rows=list(csv.reader(open(sys.argv[1]).readlines()[5:]))
hdr=rows[0]; data=rows[1:]
i_src=hdr.index("Source"); i_all=hdr.index("Warp Stall Sampling (All Samples)"); i_ni=hdr.index("Warp Stall Sampling (Not-issued Samples)")
i_exec=hdr.index("Instructions Executed")
stall_cols=[i for i,h in enumerate(hdr) if h.startswith("stall_") and "Not Issued" not in h]
tot=collections.Counter(); total=0
for r in data:
    if len(r)<len(hdr): continue
    for i in stall_cols: tot[hdr[i]]+=int(r[i] or 0)
    total+=int(r[i_all] or 0)
print("total samples",total)
for k,v in tot.most_common(12): print(f"{k:28s} {v:8d} {100*v/total:5.1f}%")
print("--- top instructions")
top=sorted(data,key=lambda r:-int(r[i_all] or 0))[:int(sys.argv[2]) if len(sys.argv)>2 else 25]
for r in top:
    st=sorted(((int(r[i] or 0),hdr[i]) for i in stall_cols),reverse=True)[:3]
    print(f"{int(r[i_all]):7d} {100*int(r[i_all])/total:5.1f}% exec={r[i_exec]:>9s} {r[i_src].strip()[:60]:60s} {st}")
