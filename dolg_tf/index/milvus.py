MILVUS_KINDS = ('FLAT',)
class MilvusIndex: pass
