"""Stream workers: Faust agents that learn from impressions and clicks in real time."""
