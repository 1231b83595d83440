"""The operator dashboard: a read-only HTML page and JSON API beside /metrics.

`DashboardData` reads the live state (on the server's event loop), `ShareHistory` keeps
allocation shares over time, `page` renders HTML with inline SVG (no scripts, no external
resources), and `http.serve` runs one HTTP server for `/metrics`, `/` and `/api/...`.
"""

from allocsvc.dashboard.data import DashboardData
from allocsvc.dashboard.history import ShareHistory

__all__ = ["DashboardData", "ShareHistory"]
