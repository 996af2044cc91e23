#!/usr/bin/perl
# The status page in a real browser: headless Chromium (Debian's) loads `/` from a running
# edge, and the rendered DOM shows the sources, each server's state, a route's counters, what
# drains, and an unrouted name; curl's `*/*` still gets JSON. The page carries no script at
# all (no <script>, no on* handler), so with JavaScript off it shows the same: the state at
# load time (headless Chromium's --dump-dom and --screenshot need script themselves, so the
# browser runs with it on). Screenshots, desktop and phone widths, are saved under target/.

use strict;
use warnings;
use Test::More;
use JSON::PP;
use Edge::Test qw(http_get raw_exchange wait_for);

my ($chromium) = grep { -x } map { "/usr/bin/$_" } qw(chromium chromium-browser);
plan skip_all => 'chromium is not installed (apt-get install chromium)' unless $chromium;

my $t = Edge::Test->new;
my $dead = $t->port('dead');
$t->write_routes('routes.json', encode_json({
    upstreams => {
        web => { servers => ['127.0.0.1:' . $t->port('back')] },
        dead => { servers => ["127.0.0.1:$dead"],
                  check => { type => 'tcp', interval => '500ms', timeout => '200ms', fall => 1 } },
    },
    routes => { 'shop.test' => 'web', 'dead.test' => 'dead',
                'closed.test' => { upstream => 'web', limits => { deny => ['all'] } } },
}));
$t->config(<<'EOF', workers => 2);
    edge_routes %%TESTDIR%%/routes.json interval=100ms;
    server { listen 127.0.0.1:%%PORT_edge%%; edge_route http; proxy_pass $edge_upstream; }
    server { listen 127.0.0.1:%%PORT_status%%; edge_status; }
    server { listen 127.0.0.1:%%PORT_back%%; return "x"; }
EOF
$t->run;
my ($edge, $status) = ($t->port('edge'), $t->port('status'));
http_get($edge, 'shop.test') eq 'x' or die "shop.test: no answer\n" for 1 .. 7;
http_get($edge, 'typo.test') for 1 .. 3;
http_get($edge, 'closed.test') for 1 .. 2;    # refused by the route's limits
wait_for(sub { (Edge::Test::server_state($status, 'dead', "127.0.0.1:$dead") // {})->{state} eq 'down' },
    'the dead server to be down');

# What a browser gets: HTML, without script; what curl gets: JSON.
my $page = raw_exchange($status, ["GET / HTTP/1.1\r\nHost: edge\r\nAccept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n\r\n"]);
like($page, qr{^HTTP/1\.1 200 OK\r\n(?:.*\r\n)*Content-Type: text/html; charset=utf-8\r\n}, 'a browser gets HTML at /');
unlike($page, qr/<script|\son[a-z]+=|javascript:/i, 'the page has no script, no handler');
my $json = raw_exchange($status, ["GET / HTTP/1.1\r\nHost: edge\r\nAccept: */*\r\n\r\n"]);
like($json, qr{\r\nContent-Type: application/json\r\n}, 'curl still gets JSON at /');

mkdir "$ENV{PWD}/target";
my $home = $t->dir . '/chromium';
sub chromium {
    my (@args) = @_;
    # A headless browser that hangs must not hang the suite.
    my @cmd = ('timeout', '60', $chromium, '--headless', '--no-sandbox', '--disable-gpu', '--no-first-run',
        '--disable-dev-shm-usage', "--user-data-dir=$home",
        @args, "http://127.0.0.1:$status/");
    my $pid = open(my $out, '-|') // die "fork: $!\n";
    if (!$pid) {
        open STDERR, '>', $t->dir . '/chromium.log';
        { exec @cmd }
        POSIX::_exit(127);
    }
    require POSIX;
    my $text = do { local $/; <$out> } // '';
    close $out;
    return $text;
}

my $dom = chromium('--dump-dom');
like($dom, qr{<table id="sources">.*<code>\Q${\ $t->dir}\E/routes\.json</code>}s, 'the DOM shows the route source');
like($dom, qr{<table id="servers">.*<code>127\.0\.0\.1:$dead</code></td><td><span class="b bad">down</span>}s,
    "the DOM shows a server's state");
like($dom, qr{<table id="routes">.*<code>shop\.test</code></td><td>exact</td><td>http</td><td class="n">7</td>}s,
    "the DOM shows a route's counters");
like($dom, qr{<table id="routes">.*<code>closed\.test</code></td><td>exact</td><td>http</td><td class="n">0</td>(?:<td[^>]*>[^<]*</td>){5}<td class="n">2</td>}s,
    "the DOM shows a route's refusals");
like($dom, qr{<table id="unrouted">.*<code>typo\.test</code></td><td>http</td><td class="n">3</td>}s,
    'the DOM shows an unrouted name');
like($dom, qr{<p class="sub" id="draining">no server is draining</p>}, 'and that nothing drains');

for my $shot (['status-page.png', '1280,1400'], ['status-page-phone.png', '390,1600']) {
    my ($file, $size) = @$shot;
    my $path = "$ENV{PWD}/target/$file";
    unlink $path;
    chromium("--screenshot=$path", "--window-size=$size", '--hide-scrollbars');
    ok(-s $path && -s $path > 10_000, "a screenshot: target/$file") or diag($t->read_file('chromium.log'));
}
unlike($t->read_file('error.log'), qr/\[(alert|crit|emerg)\]/, 'nothing worse than an error');
done_testing;
