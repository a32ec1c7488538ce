package processor

import (
	"embed"
	"io/fs"
	"net/http"
)

// pageFiles is the human page: static HTML, JS and CSS that render the JSON
// API in the browser. Everything is embedded so that the page works offline
// and needs no CDN.
//
//go:embed page/*
var pageFiles embed.FS

// pageCSP allows the page's own files and API only: no inline script, no
// third-party origin, no framing.
const pageCSP = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"

// pageHandler serves the human page at / and its assets next to it.
func pageHandler() http.Handler {
	sub, err := fs.Sub(pageFiles, "page")
	if err != nil {
		// fs.Sub only fails on an invalid path, and "page" is valid.
		panic(err)
	}
	files := http.FileServerFS(sub)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("Content-Security-Policy", pageCSP)
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("Referrer-Policy", "no-referrer")
		// The files change with the binary; embed.FS has no modification
		// times, so ask browsers to revalidate rather than cache blindly.
		h.Set("Cache-Control", "no-cache")
		files.ServeHTTP(w, r)
	})
}
