package processor

import "net/http"

// pageHandler serves the human page at /.
func pageHandler() http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		_, _ = w.Write([]byte("<!doctype html><title>funnelwatch</title><p>See <a href=\"/api/v1/segments\">/api/v1/segments</a>.</p>"))
	})
}
