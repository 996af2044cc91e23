#!/usr/bin/perl
# ACME end to end through the edge: Debian's pebble (the Let's Encrypt test CA) validates
# HTTP-01 on the edge's http listener and TLS-ALPN-01 on its tls listener; the edge hands each
# challenge to the "cluster" whose ACME client asked (lego, certbot). Then a route moves to the
# other cluster by a file rewrite, and a name without a route fails validation.

use strict;
use warnings;
use Test::More;
use IO::Socket::INET;
use Edge::Test qw(wait_for);

for my $bin (qw(pebble pebble-challtestsrv lego certbot openssl)) {
    plan skip_all => "$bin is not installed (nginx-test/prereqs installs it)" unless grep { -x "$_/$bin" } split /:/, $ENV{PATH};
}

my $t = Edge::Test->new;
my $dir = $t->dir;
my ($http, $tls) = ($t->port('http'), $t->port('tls'));
my ($acme, $acme_mgmt, $dns, $dns_mgmt) = map { $t->port($_) } qw(acme acme_mgmt dns dns_mgmt);

# pebble's API needs a TLS certificate: a CA of our own, and a certificate for 127.0.0.1.
sub run_ok { my ($cmd) = @_; system("$cmd >>$dir/openssl.log 2>&1") == 0 or BAIL_OUT("failed: $cmd") }
run_ok("openssl req -x509 -newkey rsa:2048 -nodes -subj /CN=edge-test-ca -days 2 -keyout $dir/ca.key -out $dir/ca.pem");
run_ok("openssl req -newkey rsa:2048 -nodes -subj /CN=localhost -keyout $dir/api.key -out $dir/api.csr");
$t->write_file('api.ext', "subjectAltName=IP:127.0.0.1,DNS:localhost\n");
run_ok("openssl x509 -req -in $dir/api.csr -CA $dir/ca.pem -CAkey $dir/ca.key -CAcreateserial -days 2 "
    . "-extfile $dir/api.ext -out $dir/api.pem");

$t->write_file('pebble.json', <<"EOF");
{"pebble": {"listenAddress": "127.0.0.1:$acme", "managementListenAddress": "127.0.0.1:$acme_mgmt",
  "certificate": "$dir/api.pem", "privateKey": "$dir/api.key",
  "httpPort": $http, "tlsPort": $tls, "ocspResponderURL": "", "externalAccountBindingRequired": false}}
EOF

my @children;
sub spawn {
    my ($log, %env) = (shift, %{shift()});
    my @cmd = @_;
    my $pid = fork() // die "fork: $!";
    if ($pid == 0) {
        @ENV{keys %env} = values %env;
        open STDOUT, '>', "$dir/$log";
        open STDERR, '>&', \*STDOUT;
        exec @cmd;
        exit 127;
    }
    push @children, $pid;
}
END { local $?; kill 'TERM', @children; waitpid($_, 0) for @children }

# Every name resolves to the edge (127.0.0.1); challtestsrv answers DNS only.
spawn('challtestsrv.log', {}, 'pebble-challtestsrv', '-management', "127.0.0.1:$dns_mgmt",
    '-dns01', "127.0.0.1:$dns", '-http01', '', '-https01', '', '-tlsalpn01', '',
    '-defaultIPv4', '127.0.0.1', '-defaultIPv6', '');
spawn('pebble.log', {PEBBLE_VA_NOSLEEP => 1, PEBBLE_WFE_NONCEREJECT => 0, PEBBLE_AUTHZREUSE => 0},
    'pebble', '-config', "$dir/pebble.json", '-dnsserver', "127.0.0.1:$dns");
wait_for(sub { IO::Socket::INET->new(PeerAddr => "127.0.0.1:$acme", Timeout => 1) }, 'pebble API');
wait_for(sub { IO::Socket::INET->new(PeerAddr => "127.0.0.1:$dns_mgmt", Timeout => 1) }, 'challtestsrv');

# Cluster A is 127.0.0.2, cluster B 127.0.0.3: their ACME clients listen on the edge's ports.
my $routes = <<'EOF';
{
  "upstreams": {
    "cluster-a": {"servers": ["127.0.0.2"]},
    "cluster-b": {"servers": ["127.0.0.3"]}
  },
  "routes": {
    "a.cluster-a.test": "cluster-a",
    "b.cluster-b.test": "%%B%%"
  }
}
EOF
sub routes { my ($b) = @_; (my $r = $routes) =~ s/%%B%%/$b/; $r }
$t->write_routes('routes.json', routes('cluster-b'));
$t->config(<<'EOF', workers => 2);
    edge_routes %%TESTDIR%%/routes.json interval=100ms;
    server { listen 127.0.0.1:%%PORT_http%%; edge_route http; proxy_pass $edge_upstream; }
    server { listen 127.0.0.1:%%PORT_tls%%;  edge_route tls;  proxy_pass $edge_upstream; }
EOF
$t->run;

my $server = "https://127.0.0.1:$acme/dir";
my $n = 0;
# lego: returns (exit status, output, certificate path).
sub lego {
    my ($domain, $challenge, $addr) = @_;
    my $path = "$dir/lego" . ++$n;
    my $flag = $challenge eq 'http' ? "--http --http.port $addr:$http" : "--tls --tls.port $addr:$tls";
    my $out = `LEGO_CA_CERTIFICATES=$dir/ca.pem lego --server $server --accept-tos --email ops\@edge.test --domains $domain $flag --path $path run 2>&1`;
    return ($?, $out, "$path/certificates/$domain.crt");
}

# Issuer and names of the first certificate in a PEM file.
sub cert_facts {
    my ($file) = @_;
    return ('', '') unless -s $file;
    my $text = `openssl x509 -in $file -noout -issuer -ext subjectAltName 2>&1`;
    my ($issuer) = $text =~ /issuer=.*?CN\s*=\s*([^\n,]+)/;
    my @names = $text =~ /DNS:([^,\s]+)/g;
    return ($issuer // '', join(',', @names));
}

# --- HTTP-01 through Host routing: lego in cluster A.
my ($rc, $out, $crt) = lego('a.cluster-a.test', 'http', '127.0.0.2');
is($rc, 0, 'lego --http: certificate for a.cluster-a.test') or diag($out);
my ($issuer, $names) = cert_facts($crt);
like($issuer, qr/^Pebble Intermediate CA/, 'issued by pebble');
is($names, 'a.cluster-a.test', 'for the right name');
like($t->read_file('access.log'), qr/proto=http name=a\.cluster-a\.test route=a\.cluster-a\.test upstream=nginx_edge alpn= addr=127\.0\.0\.2:$http status=200/,
    'pebble\'s validation (Host with a port) went to cluster A');

# --- certbot --standalone as a second, independent client in cluster A.
my $cb = "$dir/certbot";
$out = `REQUESTS_CA_BUNDLE=$dir/ca.pem certbot certonly --standalone --non-interactive --agree-tos -m ops\@edge.test --no-eff-email --server $server -d a.cluster-a.test --http-01-address 127.0.0.2 --http-01-port $http --config-dir $cb/config --work-dir $cb/work --logs-dir $cb/logs 2>&1`;
is($?, 0, 'certbot --standalone: certificate for a.cluster-a.test') or diag($out);
($issuer, $names) = cert_facts("$cb/config/live/a.cluster-a.test/cert.pem");
like($issuer, qr/^Pebble Intermediate CA/, 'issued by pebble');
is($names, 'a.cluster-a.test', 'for the right name');

# --- TLS-ALPN-01 through SNI routing: lego in cluster B.
($rc, $out, $crt) = lego('b.cluster-b.test', 'tls', '127.0.0.3');
is($rc, 0, 'lego --tls: certificate for b.cluster-b.test') or diag($out);
($issuer, $names) = cert_facts($crt);
like($issuer, qr/^Pebble Intermediate CA/, 'issued by pebble');
is($names, 'b.cluster-b.test', 'for the right name');
like($t->read_file('access.log'), qr/proto=tls name=b\.cluster-b\.test route=b\.cluster-b\.test upstream=nginx_edge alpn=acme-tls\/1 addr=127\.0\.0\.3:$tls status=200/,
    'the validation carried ALPN acme-tls/1, logged in $edge_alpn, and went to cluster B');

# --- The route moves to cluster A by a file rewrite, without an nginx reload.
# (Both workers: pebble's validation may reach either.)
$t->swap_routes('routes.json', routes('cluster-a'), 2);
($rc, $out, $crt) = lego('b.cluster-b.test', 'tls', '127.0.0.2');
is($rc, 0, 'after the move, cluster A gets a certificate for b.cluster-b.test') or diag($out);
($issuer, $names) = cert_facts($crt);
is($names, 'b.cluster-b.test', 'for the right name');
like($t->read_file('access.log'), qr/name=b\.cluster-b\.test .* addr=127\.0\.0\.2:$tls status=200/,
    'the validation went to cluster A');

# --- A name without a route: the CA reaches no one, and the edge says so.
($rc, $out) = lego('c.nowhere.test', 'http', '127.0.0.2');
isnt($rc, 0, 'a challenge for an unrouted name fails');
like($out, qr/c\.nowhere\.test/, 'lego names the failed domain');
$t->wait_for_log(qr/\[info\] .* edge: no route for "c\.nowhere\.test" \(http\) and no default, closing while prereading client data, client: 127\.0\.0\.1, server: 127\.0\.0\.1:$http/);
pass('the edge logged the unrouted name, with the client address');
like($t->read_file('access.log'), qr/name=c\.nowhere\.test route=- upstream=- alpn= addr=- status=403/,
    'and closed the validation connection (403 in the access log)');

done_testing;
