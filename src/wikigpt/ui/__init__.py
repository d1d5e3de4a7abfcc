"""The web UI (Streamlit): `app.py` is the script `wikigpt ui` runs, one module per page, the
shared pieces in `common.py`. It talks to the API only over HTTP (`wikigpt.client`): no torch,
so the UI image installs `wikigpt[ui]` alone."""
