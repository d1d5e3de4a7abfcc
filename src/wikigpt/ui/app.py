"""The web UI's entry script: `wikigpt ui` runs `streamlit run` on this file, which Streamlit
executes as `__main__` on every interaction. Two pages, one module each: continue text
(continue_page.py) and score text (score_page.py); what they share is in common.py.
"""

import streamlit as st

from wikigpt.ui.continue_page import continue_page
from wikigpt.ui.score_page import score_page

st.navigation([
    st.Page(continue_page, title="Continue text", icon=":material/edit_note:", default=True),
    st.Page(score_page, title="Score text", icon=":material/insights:", url_path="score"),
]).run()
