"""The bus topics the agents serve, in one place so that requesters and servers agree."""

PROPOSE = "agent.proposer"
SELECT_ASPECTS = "agent.critic.select"
JUDGE = "agent.critic.judge"
EDIT_PROMPT = "agent.editor.prompt"
EDIT_ANSWER = "agent.editor.answer"
#: Search events (nodes, levels, run start and end): read by the recorder and viewers.
EVENTS = "search.events"
