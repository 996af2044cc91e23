#!/usr/bin/perl
# The last good table of a URL source, as operators rely on it:
# - a restarted edge starts from it: a kind that answers first does not replace the others,
#   and a kind that fails keeps its routes;
# - one object (any tenant's) cannot stop a kind from updating, nor can a page too large;
# - what a remote source serves can never make nginx -t, a reload or a start fail: a document
#   the table refuses is not kept, a cache that cannot be used is left aside with a warning;
# - a URL source's files in the state folder, written by another process, are not read.

use strict;
use warnings;
use Test::More;
use Edge::Test qw(http_get wait_for);
use Edge::FakeKube;

my $t = Edge::Test->new;
my $dir = $t->dir;
my $kube = Edge::FakeKube->new($t, 'a', gateway => 1);
$kube->apply(Edge::FakeKube::ingress('web', 'shop', hosts => ['shop.test']));
$kube->apply(Edge::FakeKube::route('HTTPRoute', 'web', 'gw1', 'gw1.test'));
my $good_doc = $t->expand(<<'EOF');
{"upstreams": {"d": {"servers": ["127.0.0.1:%%PORT_a%%"]}}, "routes": {"d1.test": "d"}}
EOF
$kube->set_document($good_doc);
$kube->start;
$t->write_routes('routes.json', <<'EOF');
{"upstreams": {"a": {"servers": ["127.0.0.1:%%PORT_a%%"]}}}
EOF
my ($url, $doc) = ($kube->url, $kube->url('/edge.json'));
my $conf = <<"EOF";
    edge_routes %%TESTDIR%%/routes.json;
    edge_routes_url $url name=a format=k8s upstream=a timeout=2s;
    edge_routes_url $doc name=doc format=edge interval=1s timeout=2s;
    edge_state %%TESTDIR%%/state;
    server { listen 127.0.0.1:%%PORT_edge%% reuseport; edge_route http; proxy_pass \$edge_upstream; }
    server { listen 127.0.0.1:%%PORT_status%%; edge_status; }
    server { listen 127.0.0.1:%%PORT_a%%; return "a"; }
EOF
$t->config($conf, workers => 2);
my $edge = $t->port('edge');
my $routes = sub { my ($name) = @_; http_get($edge, $name) eq 'a' };
my $all_route = sub {
    my ($name, $what) = @_;
    my $streak = 0;
    wait_for(sub { $streak = $routes->($name) ? $streak + 1 : 0; $streak >= 20 }, $what // "$name routes", 60);
};
my $status = sub { Edge::Test::status_json($t->port('status'))->{urls} };
$t->run;
$all_route->($_) for qw(shop.test gw1.test d1.test);
pass('Ingresses, HTTPRoutes and a native document route');

# --- A restart while the Ingress list fails: the HTTPRoute list answers first, and must not
# take the Ingresses' routes with it.
$t->stop;
$kube->stop;
$kube->apply(Edge::FakeKube::route('HTTPRoute', 'web', 'gw2', 'gw2.test'));
$kube->set_mode('500', 'ingresses');
$kube->start;
$t->run;
$all_route->('gw2.test', 'the HTTPRoutes listed after the restart');
ok($routes->('shop.test'), 'the Ingresses keep their routes while their list fails');
$t->reload;
$all_route->('gw2.test', 'after a reload');
ok($routes->('shop.test'), 'and after a reload');
$kube->stop;
$kube->set_mode('ok');
$kube->start;

# --- One tenant's Ingress with too many hosts, in any namespace, stops nothing.
my @many = map { "h$_.huge.test" } 0 .. 1000;
$kube->apply(Edge::FakeKube::ingress('tenant', 'huge', hosts => \@many));
$kube->apply(Edge::FakeKube::ingress('web', 'after', hosts => ['after.test']));
$all_route->('after.test', 'an Ingress applied after the one with 1,001 hosts');
ok(!$routes->('h1.huge.test'), 'the one with too many hosts routes nothing');
wait_for(sub { (grep { $_->{name} eq 'a' } @{$status->()})[0]{invalid_objects} }, 'it is counted');
like($t->read_file('error.log'), qr/edge_routes_url a: 1 object\(s\) route nothing because of a problem of their own, e\.g\. Ingress tenant\/huge: 1001 hosts/,
    'and logged');
# A relist (410) with it in the list.
$kube->compact;
$kube->stop;
$kube->apply(Edge::FakeKube::ingress('web', 'relisted', hosts => ['relisted.test']));
$kube->start;
$all_route->('relisted.test', 'a relist with it in the list');

# --- A list page larger than the body limit (64 MiB): smaller pages are asked for.
$kube->stop;
$kube->set_mode('bigpages');
$kube->apply(Edge::FakeKube::ingress('web', 'paged', hosts => ['paged.test']));
$kube->compact;
$kube->start;
$all_route->('paged.test', 'a list whose pages of 500 are too large');
like($t->read_file('error.log'), qr/an answer larger than 64 MiB: asking for smaller pages/, 'it says so');
$kube->stop;
$kube->set_mode('ok');
$kube->start;

# --- A native document that names an unknown upstream: refused, and not kept.
$kube->set_document('{"routes": {"d2.test": "nope"}}');
$t->wait_for_log(qr/edge_routes_url doc: routes\["d2\.test"\]: unknown upstream "nope"; rejected/);
ok($routes->('d1.test'), 'the last good document keeps serving');
my ($ok, $out) = $t->test_config;
ok($ok, 'nginx -t passes') or diag $out;
$t->stop;
$kube->stop;
$t->run;
$all_route->('d1.test', 'started with the API server down: from the last good tables');
ok($routes->('shop.test') && $routes->('gw2.test') && $routes->('after.test'), 'all of them');

# --- Files that cannot be used at start are left aside with a warning.
$t->stop;
my @accepted = glob "$dir/state/url-*.json";
is(scalar @accepted, 2, 'each source keeps its last good table');
my ($k8s) = grep { $t->read_file("state/" . s{.*/}{}r) =~ /^\{"edge_url_cache":/ } @accepted;
my ($native) = grep { $_ ne $k8s } @accepted;
$t->write_file('state/' . ($native =~ s{.*/}{}r), '{"routes": {"d3.test": "nope"}}');
$t->write_file('state/' . ($k8s =~ s{.*/}{}r),
    '{"edge_url_cache":1,"source":"a","objects":['
    . join(',', map { qq({"kind":"Ingress","namespace":"n","name":"o$_","hosts":[],"addresses":[]}) } 0 .. 100_000)
    . ']}');
($ok, $out) = $t->test_config;
ok($ok, 'nginx -t passes with a cache too large and a document it cannot merge') or diag $out;
$out .= $t->read_file('error.log');
like($out, qr/\[warn\].*edge_routes_url doc: .*unknown upstream "nope"; not used/, 'a warning for the document');
like($out, qr/\[warn\].*edge_routes_url a: .*more than 100000 objects; not used/, 'and for the cache');
$t->write_file('state/' . ($k8s =~ s{.*/}{}r), "\0" x 100);
($ok, $out) = $t->test_config;
ok($ok, 'and with a cache of garbage') or diag $out;
$kube->set_document($good_doc);
$kube->start;
$t->run;
$all_route->('shop.test', 'the source answers again');
$all_route->('d1.test', 'the document too');

# --- The files in the state folder, written by another process, are not read: a valid
# candidate written there changes no route.
my ($candidate) = glob "$dir/state/url-*.json.next.*";
ok($candidate, 'the candidates are there');
my $native_candidate = (grep { $t->read_file('state/' . s{.*/}{}r) !~ /edge_url_cache/ } glob "$dir/state/url-*.json.next.*")[0];
$t->write_file('state/' . ($native_candidate =~ s{.*/}{}r) . '.x',
    '{"upstreams": {"e": {"servers": ["127.0.0.1:%%PORT_a%%"]}}, "routes": {"evil.test": "e"}}' =~ s/%%PORT_a%%/$t->port('a')/er);
rename "$native_candidate.x", $native_candidate or die;
$t->wait_for_log(qr/edge_routes_url doc: \S+: changed by another process than this nginx: not read/);
ok(!$routes->('evil.test'), 'a document written by another process does not route');
ok($routes->('d1.test'), 'the last good one does');
# The Kubernetes source's candidate, then its accepted copy (with no candidate, it is read).
my ($k8s_candidate) = grep { $_ ne $native_candidate } glob "$dir/state/url-*.json.next.*";
my $forged = '{"edge_url_cache":2,"source":"a","objects":[{"kind":"Ingress","namespace":"x","name":"evil",'
    . '"hosts":["evil-k8s.test"],"addresses":[]}]}';
my $mark = length $t->read_file('error.log');
$t->write_file('state/forged', $forged);
rename "$dir/state/forged", $k8s_candidate or die;
wait_for(sub { substr($t->read_file('error.log'), $mark) =~ /edge_routes_url a: \S+: changed by another process/ },
    'the forged candidate refused');
ok(!$routes->('evil-k8s.test'), "a Kubernetes source's candidate written by another process does not route");
$mark = length $t->read_file('error.log');
unlink $k8s_candidate;
my ($k8s_accepted) = map { s/\.next\.\d+$//r } $k8s_candidate;
$t->write_file('state/forged', $forged);
rename "$dir/state/forged", $k8s_accepted or die;
wait_for(sub { substr($t->read_file('error.log'), $mark) =~ /edge_routes_url a: \S+: changed by another process/ },
    'the forged accepted copy refused');
ok(!$routes->('evil-k8s.test'), 'nor its accepted copy');
ok($routes->('shop.test'), "the source's last good routes serve");
unlike($t->read_file('error.log'), qr/\[(alert|crit|emerg)\]/, 'no alert, no emerg');
done_testing;
