"""Online side: servers, clients of Triton/Feast/FAISS, the Recommender service."""
