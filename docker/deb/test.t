#!/usr/bin/perl
# libnginx-mod-stream-edge installed the way an operator installs it, in a clean container of
# each release whose Debian nginx is running with its default http {} vhost: apt-get install
# ./pkg.deb, the module loaded after nginx -s reload, a TLS and an HTTP connection routed by
# name through a file dropped into routes.d, the vhost answering as before; an upgrade to a
# rebuilt package with a higher version; remove (nginx keeps running, then starts without
# the module); purge.
#
#   prove -I nginx-test/lib docker/deb/test.t     (EDGE_RELEASES, packages from docker/deb/build)

use strict;
use warnings;
use Test::More;
use File::Basename qw(dirname);
use Cwd qw(abs_path);
use Edge::Docker qw(docker docker_ok ip_of exchange tls_exchange in_container wait_for);

my $top = abs_path(dirname(__FILE__) . '/../..');
my @releases = split ' ', ($ENV{EDGE_RELEASES} // 'bookworm trixie');
my %debs;
for my $r (@releases) {
    my @found = map { s{.*/}{}r } grep { !/-dbgsym_/ } glob("$top/target/deb/$r/libnginx-mod-stream-edge_*.deb");
    # Oldest version first.
    @found = sort { system('dpkg', '--compare-versions', version($a), 'lt', version($b)) == 0 ? -1 : 1 } @found;
    plan skip_all => "two versions of the $r package are needed (docker/deb/run builds them)" if @found < 2;
    $debs{$r} = [@found[0, -1]];
}
sub version { $_[0] =~ /_([^_]+)_[^_]+\.deb$/ ? $1 : '' }

my @containers;
END { local $?; docker('rm', '-f', @containers) if @containers }

sub sh {
    my ($c, $script) = @_;
    my $out = in_container($c, 'bash', '-c', $script);
    return wantarray ? ($? >> 8, $out) : $out;
}

sub request { "GET / HTTP/1.0\r\nHost: $_[0]\r\n\r\n" }
sub body { $_[0] =~ s/^.*?\r\n\r\n//sr }

for my $release (@releases) {
    my ($old, $new) = @{ $debs{$release} };
    my ($v_old, $v_new) = (version($old), version($new));

    # A clean container with Debian's nginx from the archive, nothing of ours.
    my $image = "nginx-edge-debtest:$release";
    my $dockerfile = "FROM debian:$release-slim\nENV DEBIAN_FRONTEND=noninteractive\n"
        . "RUN apt-get update -q && apt-get install -y -q --no-install-recommends nginx curl openssl procps\n";
    open(my $build, '|-', "docker build -q -t $image - >/dev/null") or die "docker build: $!";
    print $build $dockerfile;
    close $build or die "docker build $image failed\n";

    my $c = "edge-deb-test-$$-$release";
    docker_ok('run', '-d', '--init', '--name', $c, '-v', "$top/target/deb/$release:/debs:ro", $image, 'sleep', 'infinity');
    push @containers, $c;
    my $ip = ip_of($c);

    # Backends the routes will name, beside Debian's default vhost on :80.
    my ($rc, $out) = sh($c, <<'SH');
set -e
openssl req -x509 -newkey rsa:2048 -nodes -subj /CN=deb-backend -days 2 \
    -keyout /etc/nginx/backend.key -out /etc/nginx/backend.crt 2>/dev/null
cat > /etc/nginx/conf.d/backends.conf <<'CONF'
server { listen 127.0.0.1:8081; return 200 "backend http $host\n"; }
server { listen 127.0.0.1:8444 ssl; ssl_certificate /etc/nginx/backend.crt;
         ssl_certificate_key /etc/nginx/backend.key; return 200 "backend tls $ssl_server_name\n"; }
CONF
/etc/init.d/nginx start
SH
    is($rc, 0, "$release: Debian's nginx started") or diag($out);
    my $vhost = body(exchange($ip, 80, request('localhost')));
    like($vhost, qr/Welcome to nginx/, "$release: its default vhost answers");
    my $master = sh($c, 'cat /run/nginx.pid');

    # --- Install.
    ($rc, $out) = sh($c, "apt-get update -q >/dev/null && apt-get install -y -q ./debs/$old 2>&1");
    is($rc, 0, "$release: apt-get install ./$old") or diag($out);
    like($out, qr/libnginx-mod-stream\b/, "$release: it brought libnginx-mod-stream");
    is(sh($c, 'readlink /etc/nginx/modules-enabled/70-mod-stream-edge.conf'),
        "/usr/share/nginx/modules-available/mod-stream-edge.conf\n", "$release: enabled after mod-stream (70 > 50)");
    is(sh($c, 'cat /usr/share/nginx/modules-available/mod-stream-edge.conf'),
        "load_module modules/ngx_stream_edge_module.so;\n", "$release: the load file");
    like(sh($c, 'dpkg -s libnginx-mod-stream-edge | grep ^Depends'), qr/nginx-abi-1\.\d+\.\d+-\d+/,
        "$release: depends on the nginx ABI it was built against");
    is(sh($c, 'test -e /var/lib/nginx/edge_state && echo made || echo absent'), "absent\n",
        "$release: no state folder before a configuration needs one (nginx makes it)");
    is(sh($c, 'ls -A /etc/nginx/edge/routes.d | wc -l'), "0\n", "$release: routes.d is there, empty");
    like(sh($c, 'ls /usr/share/doc/libnginx-mod-stream-edge/examples'), qr/10-example\.json.*stream-edge\.conf/s,
        "$release: the examples are in /usr/share/doc");
    is(sh($c, 'cat /run/nginx.pid'), $master, "$release: nginx was not restarted");
    is(body(exchange($ip, 80, request('localhost'))), $vhost, "$release: the vhost answers as before");

    # --- The operator's stream {} block (the example, on other ports) and a route file.
    ($rc, $out) = sh($c, <<'SH');
set -e
sed -e 's/listen 443;/listen 8443;/' -e 's/listen 80; /listen 8080; /' \
    /usr/share/doc/libnginx-mod-stream-edge/examples/stream-edge.conf > /etc/nginx/edge/stream.conf
echo 'include /etc/nginx/edge/stream.conf;' >> /etc/nginx/nginx.conf
cat > /etc/nginx/edge/routes.d/10-test.json.tmp <<'JSON'
{"version": 1,
 "upstreams": {"web": {"servers": ["127.0.0.1:8081"]}, "secure": {"servers": ["127.0.0.1:8444"]}},
 "routes": {"a.test": {"http": "web", "tls": "secure"}}}
JSON
mv /etc/nginx/edge/routes.d/10-test.json.tmp /etc/nginx/edge/routes.d/10-test.json
nginx -t 2>&1
nginx -s reload
SH
    is($rc, 0, "$release: nginx -t and nginx -s reload with the stream block") or diag($out);
    wait_for(sub { body(exchange($ip, 8080, request('a.test'))) eq "backend http a.test\n" }, "$release: HTTP routed", 60);
    pass("$release: HTTP routed by Host through routes.d");
    my ($answer) = tls_exchange($ip, 8443, 'a.test', request('a.test'));
    is(body($answer), "backend tls a.test\n", "$release: TLS routed by SNI through routes.d");
    is(exchange($ip, 8080, request('b.test')), '', "$release: a name without a route is closed");
    is(body(exchange($ip, 80, request('localhost'))), $vhost, "$release: the vhost answers as before");

    # --- Upgrade to the rebuilt package.
    ($rc, $out) = sh($c, "apt-get install -y -q ./debs/$new 2>&1");
    is($rc, 0, "$release: upgrade to $v_new") or diag($out);
    is(sh($c, "dpkg-query -W -f '\${Version}' libnginx-mod-stream-edge"), $v_new, "$release: $v_new installed");
    ($rc, $out) = sh($c, 'nginx -s reload 2>&1');
    is($rc, 0, "$release: reloaded") or diag($out);
    wait_for(sub { body(exchange($ip, 8080, request('a.test'))) eq "backend http a.test\n" }, "$release: routed after the upgrade", 60);
    ($answer) = tls_exchange($ip, 8443, 'a.test', request('a.test'));
    is(body($answer), "backend tls a.test\n", "$release: still routing TLS after the upgrade");
    is(sh($c, 'cat /run/nginx.pid'), $master, "$release: the same nginx master throughout");

    # --- Remove while nginx.conf still uses the module: nginx keeps running, and the package says why it would not start.
    ($rc, $out) = sh($c, 'apt-get remove -y -q libnginx-mod-stream-edge 2>&1');
    is($rc, 0, "$release: apt-get remove") or diag($out);
    like($out, qr/nginx -t' fails without the module.*remove the edge_\* directives/s, "$release: the removal says what nginx would need");
    ok(-1 != index(sh($c, 'ls /etc/nginx/modules-enabled/'), '70-mod-stream-edge.conf.removed'), "$release: the module is disabled");
    is(body(exchange($ip, 80, request('localhost'))), $vhost, "$release: the running nginx still answers");
    ($rc, $out) = sh($c, "sed -i '/edge\\/stream.conf/d' /etc/nginx/nginx.conf && /etc/init.d/nginx restart 2>&1");
    is($rc, 0, "$release: without the stream block, nginx restarts") or diag($out);
    unlike(sh($c, 'nginx -T 2>/dev/null'), qr/ngx_stream_edge_module/, "$release: without the module");
    is(body(exchange($ip, 80, request('localhost'))), $vhost, "$release: the vhost answers");
    like(exchange($ip, 8080, request('a.test')), qr/^connect failed/, "$release: and the edge's listener is gone");

    # --- Purge.
    ($rc, $out) = sh($c, 'apt-get purge -y -q libnginx-mod-stream-edge 2>&1');
    is($rc, 0, "$release: apt-get purge") or diag($out);
    is(sh($c, 'dpkg-query -W -f "\${Status}" libnginx-mod-stream-edge 2>&1') =~ /ok installed|config-files/ ? 'left' : 'gone', 'gone',
        "$release: the package is gone");
    is(sh($c, 'ls /etc/nginx/modules-enabled/ | grep -c stream-edge'), "0\n", "$release: no link left");
    is(sh($c, 'test -e /var/lib/nginx/edge_state && echo left || echo gone'), "gone\n", "$release: the state folder is gone");
    is(sh($c, 'ls /etc/nginx/edge/routes.d/'), "10-test.json\n", "$release: the operator's route file is kept");
    is(body(exchange($ip, 80, request('localhost'))), $vhost, "$release: nginx still answers");
    is(sh($c, 'nginx -t -q 2>&1; echo $?'), "0\n", "$release: and its configuration tests clean");
}

done_testing;
